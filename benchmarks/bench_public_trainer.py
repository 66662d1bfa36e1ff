"""Our ConvLSTM through our trainer against OpenSTL's ConvLSTM through its own training step, same data, same steps.

    python benchmarks/bench_public_trainer.py --openstl /tmp/openstl [--steps 100] [--batch 4] [--threads 2]
        [--python /tmp/openstl-venv/bin/python] [--arch ours|config] [--with-flow] [--set key=value ...]
        [--out /tmp/bench_public_trainer]

Setting up the public side (nothing of it enters this repository):

1. a checkout of OpenSTL (github chengtan9907/OpenSTL; measured at c74deb5) outside the repo, e.g.
   from a bare mirror: ``mkdir /tmp/openstl && git --git-dir=<mirror> archive <commit> | tar -x -C /tmp/openstl``
   (or ``git clone https://github.com/chengtan9907/OpenSTL /tmp/openstl``);
2. a venv for it (optional: the OpenSTL files used need only torch and numpy, so this repo's .venv
   runs them too): ``python3.11 -m venv /tmp/openstl-venv && /tmp/openstl-venv/bin/pip install
   torch==2.13.0 numpy h5py`` (pin torch: an unpinned torch pulls the CUDA build). ``--python``
   picks the interpreter of the OpenSTL child (default: /tmp/openstl-venv/bin/python when it
   exists, else this one).

What runs, in one invocation, on the windows files of ``--windows`` (read only):

- OpenSTL (a child process of ``--python``, which imports only torch, numpy and h5py besides the
  checkout): its model module ``openstl.models.convlstm_model.ConvLSTM_Model`` and its helpers
  ``openstl.utils.predrnn_utils`` (``reshape_patch``, ``schedule_sampling``) and
  ``openstl.core.optim_scheduler.get_optim_scheduler`` are imported from the checkout as they
  are, without the packages' ``__init__`` files (those import every model and Lightning, timm,
  lpips, ...; the ``timm`` names that ``optim_scheduler`` imports are stubbed when timm is missing,
  and the Adam / OneCycle path used never touches them). The training step is the one of
  ``openstl.methods.PredRNN.training_step`` (ConvLSTM's method): inputs and targets concatenated,
  patched, a scheduled-sampling mask, the model's own loss (MSE on all next frames), then an
  optimiser and scheduler step as Lightning takes them (no clipping, OneCycle stepped per step).
  Settings of ``configs/mmnist/ConvLSTM.py`` and OpenSTL's default parser: Adam, lr 5e-4,
  weight decay 0, onecycle over the N steps, scheduled sampling from 1.0 by 2e-5 per step,
  stride 1, no layer norm. Batches of ``--batch`` (4) drawn from a seeded shuffle of train.h5,
  VIL / 255. The architecture: ``--arch ours`` (default) sizes it like our convlstm (params
  ``model.convlstm.hidden``, ``kernel_size``, ``model.patch_size``: 2 x 32 channels, 3 x 3, patch 8),
  so both sides cost about the same per step; ``--arch config`` is the config's 4 x 128 channels,
  5 x 5, patch 4 (about 50x the compute per step: minutes per step on 2 CPU cores). Test
  forecasts are made as ``PredRNN.forward`` makes them (mask all zeros, so the truth is never
  read; the target slots are fed zeros here) and saved to ``<out>/openstl_preds.npy``.
- ours: ``pipeline.training.fit`` phase 1 of ``model.name: convlstm`` with params.yaml (plus
  ``--set``), batch ``--batch``, exactly N steps (``epochs x max_steps_per_epoch = N``, at most
  one pass per epoch), checkpoints in a temporary folder, no tracking. Scored from its
  ``last.pt`` (the weights after N steps, as on the OpenSTL side; validation does not pick).
- scoring, in this process: ``pipeline.scoring.evaluation.evaluate`` on test.h5 with the
  ``evaluate`` params, for ours (``model_from_checkpoint``), OpenSTL's saved forecasts (as given,
  and clipped to 0-1: its head is linear) and persistence (``--with-flow``: optical flow too).

Prints test CSI-M, HSS-M, MSE and SSIM after N steps for each, CSI-M and MSE ratios, and the
per-step wall time of both trainers (median over the steps after the first; OpenSTL: batch
assembly + step; ours: the trainer's epoch time / steps, loader included). Both train with
``--threads`` torch threads, one after the other. No asserts.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ the OpenSTL child (torch, numpy, h5py only)
def _load_openstl(checkout: Path):
    """OpenSTL's ConvLSTM model class, predrnn helpers and optimiser factory, imported from ``checkout``."""
    import importlib
    import types

    pkg_root = checkout / "openstl"
    if not (pkg_root / "models" / "convlstm_model.py").is_file():
        raise SystemExit(f"{checkout}: not an OpenSTL checkout (no openstl/models/convlstm_model.py)")
    for name in ("openstl", "openstl.modules", "openstl.models", "openstl.utils", "openstl.core"):
        mod = types.ModuleType(name)  # the packages without their __init__ (which import every model)
        mod.__path__ = [str(pkg_root.joinpath(*name.split(".")[1:]))]
        sys.modules[name] = mod
    cells = importlib.import_module("openstl.modules.convlstm_modules")
    sys.modules["openstl.modules"].ConvLSTMCell = cells.ConvLSTMCell
    model_mod = importlib.import_module("openstl.models.convlstm_model")
    utils = importlib.import_module("openstl.utils.predrnn_utils")
    try:
        import timm.optim  # noqa: F401
    except Exception:  # stub the names optim_scheduler imports; the adam/onecycle path never uses them
        for name, attrs in {"timm.optim.adafactor": ["Adafactor"], "timm.optim.adahessian": ["Adahessian"],
                            "timm.optim.adamp": ["AdamP"], "timm.optim.lookahead": ["Lookahead"],
                            "timm.optim.nadam": ["Nadam"], "timm.optim.nvnovograd": ["NvNovoGrad"],
                            "timm.optim.radam": ["RAdam"], "timm.optim.rmsprop_tf": ["RMSpropTF"],
                            "timm.optim.sgdp": ["SGDP"], "timm.scheduler.cosine_lr": ["CosineLRScheduler"],
                            "timm.scheduler.multistep_lr": ["MultiStepLRScheduler"],
                            "timm.scheduler.step_lr": ["StepLRScheduler"],
                            "timm.scheduler.tanh_lr": ["TanhLRScheduler"]}.items():  # fmt: skip
            parts = name.split(".")
            for i in range(1, len(parts) + 1):
                sys.modules.setdefault(".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
            for attr in attrs:
                setattr(sys.modules[name], attr, None)
    optim = importlib.import_module("openstl.core.optim_scheduler")
    return model_mod.ConvLSTM_Model, utils, optim.get_optim_scheduler


def _windows(path: Path, in_len: int, out_len: int):
    """All windows of a windows file as uint8 (N, in_len + out_len, H, W) (layout: pipeline/sevir/dataset.py)."""
    import h5py
    import numpy as np

    with h5py.File(path, "r") as h5:
        vil = h5["vil"][()]  # (events, frames, H, W) uint8
        event, start = h5["window_event"][()], h5["window_start"][()]
        origin = int(h5.attrs["in_len"])  # the stored forecast origin within each window
    lo = start.astype(np.int64) + origin - in_len
    return np.stack([vil[e, s : s + in_len + out_len] for e, s in zip(event, lo, strict=True)])


def openstl_worker(args: argparse.Namespace) -> int:
    import types

    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)  # scheduled sampling draws from numpy's global generator
    ConvLSTM_Model, utils, get_optim_scheduler = _load_openstl(Path(args.openstl))
    in_len, out_len = args.in_len, args.out_len
    train = _windows(Path(args.train), in_len, out_len)
    test = _windows(Path(args.test), in_len, out_len)
    H, W = train.shape[-2:]
    hidden = [int(x) for x in args.num_hidden.split(",")]
    hp = types.SimpleNamespace(
        # configs/mmnist/ConvLSTM.py
        method="ConvLSTM", reverse_scheduled_sampling=0, r_sampling_step_1=25000, r_sampling_step_2=50000,
        r_exp_alpha=5000, scheduled_sampling=1, sampling_stop_iter=50000, sampling_start_value=1.0,
        sampling_changing_rate=0.00002, num_hidden=args.num_hidden, filter_size=args.filter_size, stride=1,
        patch_size=args.patch_size, layer_norm=0, lr=args.lr, sched="onecycle",
        # openstl/utils/parser.py defaults
        opt="adam", opt_eps=None, opt_betas=None, momentum=0.9, weight_decay=0.0, filter_bias_and_bn=False,
        final_div_factor=1e4, gpus=[0],
        # the data
        in_shape=(in_len, 1, H, W), pre_seq_length=in_len, aft_seq_length=out_len, total_length=in_len + out_len,
        device="cpu", batch_size=args.batch,
    )  # fmt: skip
    model = ConvLSTM_Model(len(hidden), hidden, hp)
    optimizer, scheduler, by_epoch = get_optim_scheduler(hp, 1, model, args.steps)
    n_params = sum(p.numel() for p in model.parameters())
    rng = np.random.default_rng(args.seed)
    perm, pos, eta = rng.permutation(len(train)), 0, hp.sampling_start_value
    walls, losses = [], []
    model.train()
    t_all = time.perf_counter()
    for step in range(args.steps):
        t0 = time.perf_counter()
        if pos + args.batch > len(train):  # a new epoch, the last short batch dropped
            perm, pos = rng.permutation(len(train)), 0
        idx = np.sort(perm[pos : pos + args.batch])
        pos += args.batch
        clip = torch.from_numpy(train[idx]).float().div_(255.0).unsqueeze(2)  # (B, T, 1, H, W)
        batch_x, batch_y = clip[:, :in_len], clip[:, in_len:]
        # openstl.methods.PredRNN.training_step
        ims = torch.cat([batch_x, batch_y], dim=1).permute(0, 1, 3, 4, 2).contiguous()
        ims = utils.reshape_patch(ims, hp.patch_size)
        eta, real_input_flag = utils.schedule_sampling(eta, step, ims.shape[0], hp)
        _, loss = model(ims, real_input_flag)
        # what Lightning does with the returned loss: zero_grad, backward, optimiser step, per-step scheduler
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if not by_epoch:
            scheduler.step()
        walls.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
    train_s = time.perf_counter() - t_all

    # openstl.methods.PredRNN.forward: mask all zeros (every target slot fed the model's own output)
    model.eval()
    preds = np.empty((len(test), out_len, 1, H, W), np.float32)
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(test), args.batch):
            x = torch.from_numpy(test[i : i + args.batch, :in_len]).float().div_(255.0).unsqueeze(2)
            b = x.shape[0]
            ims = torch.cat([x, torch.zeros(b, out_len, 1, H, W)], dim=1).permute(0, 1, 3, 4, 2).contiguous()
            ims = utils.reshape_patch(ims, hp.patch_size)
            flag = torch.zeros(b, hp.total_length - in_len - 1, H // hp.patch_size, W // hp.patch_size,
                               hp.patch_size**2)  # fmt: skip
            gen, _ = model(ims, flag, return_loss=False)
            gen = utils.reshape_patch_back(gen, hp.patch_size)
            preds[i : i + b] = gen[:, -out_len:].permute(0, 1, 4, 2, 3).numpy()
    predict_s = time.perf_counter() - t0
    out = Path(args.out)
    np.save(out / "openstl_preds.npy", preds)
    info = {"torch": torch.__version__, "python": sys.executable, "params": n_params, "steps": args.steps,
            "batch": args.batch, "threads": args.threads, "train_s": train_s, "predict_s": predict_s,
            "step_wall_s": walls, "loss_first10": statistics.fmean(losses[:10]), "loss_last10": statistics.fmean(losses[-10:]),
            "arch": {"num_hidden": hidden, "filter_size": args.filter_size, "patch_size": args.patch_size},
            "lr": args.lr, "final_lr": float(scheduler.get_last_lr()[0]), "final_eta": float(eta)}  # fmt: skip
    (out / "openstl.json").write_text(json.dumps(info, indent=2))
    return 0


# ------------------------------------------------------------------ ours + scoring (this repo's venv)
def _set_key(tree: dict, key: str, value) -> None:
    parts = key.split(".")
    for part in parts[:-1]:
        tree = tree.setdefault(part, {})
    tree[parts[-1]] = value


def _epochs_for(n: int, per_pass: int) -> tuple[int, int]:
    """(epochs, steps per epoch) with epochs x steps == n and steps <= per_pass (closest below when none divides)."""
    for epochs in range(max(1, math.ceil(n / per_pass)), n + 1):
        if n % epochs == 0 and n // epochs <= per_pass:
            return epochs, n // epochs
    return n, 1


class StoredForecaster:
    """Forecasts saved by another program, handed out batch by batch in the evaluation loader's (unshuffled) order."""

    def __init__(self, preds, clip: bool = False):
        import torch

        self.preds = torch.from_numpy(preds)
        self.clip, self.pos = clip, 0

    def __call__(self, inputs, out_len: int):
        b = inputs.shape[0]
        out = self.preds[self.pos : self.pos + b, :out_len]
        self.pos += b
        return out.clamp(0.0, 1.0) if self.clip else out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--openstl", required=True, help="path of an OpenSTL checkout (outside this repository)")
    ap.add_argument("--steps", type=int, default=100, help="training steps N of each side")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--python", default=None, help="interpreter of the OpenSTL child (default: /tmp/openstl-venv/bin/python "
                    "when present, else this one)")  # fmt: skip
    ap.add_argument("--arch", choices=("ours", "config"), default="ours",
                    help="OpenSTL ConvLSTM size: ours (our convlstm's channels, kernel, patch) | config (4x128, 5x5, patch 4)")  # fmt: skip
    ap.add_argument("--lr", type=float, default=5e-4, help="OpenSTL lr (configs/mmnist/ConvLSTM.py: 5e-4)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override of our params (repeatable)"
    )
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--windows", default=str(ROOT / "data" / "windows"), help="folder of train/val/test.h5 (read only)")
    ap.add_argument("--with-flow", action="store_true", help="score optical flow too (~40 s on 2 cores)")
    ap.add_argument("--skip-ours", action="store_true", help="train and score only the OpenSTL side")
    ap.add_argument("--out", default="/tmp/bench_public_trainer")
    # the child's own flags
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--train", help=argparse.SUPPRESS)
    ap.add_argument("--test", help=argparse.SUPPRESS)
    ap.add_argument("--in-len", type=int, default=13, help=argparse.SUPPRESS)
    ap.add_argument("--out-len", type=int, default=12, help=argparse.SUPPRESS)
    ap.add_argument("--num-hidden", default="32,32", help=argparse.SUPPRESS)
    ap.add_argument("--filter-size", type=int, default=3, help=argparse.SUPPRESS)
    ap.add_argument("--patch-size", type=int, default=8, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return openstl_worker(args)

    sys.path.insert(0, str(ROOT))
    import logging

    import numpy as np
    import torch
    import yaml

    import models
    from pipeline import config as config_mod
    from pipeline.scoring import evaluation
    from pipeline.scoring.forecasters import get_method, model_from_checkpoint
    from pipeline.training import fit

    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    raw = yaml.safe_load(Path(args.params).read_text())
    windows = Path(args.windows).resolve()
    for key, value in {"model.name": "convlstm", "windows.root": str(windows), "train.device": "cpu",
                       "train.threads": args.threads, "train.batch_size": args.batch, "tracking.enabled": False}.items():  # fmt: skip
        _set_key(raw, key, value)
    for item in args.set:
        key, value = item.split("=", 1)
        _set_key(raw, key.strip(), yaml.safe_load(value))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = config_mod.from_dict(raw, source="bench_public_trainer")
    if args.arch == "ours":
        arch = {"num_hidden": ",".join(str(h) for h in cfg.model.convlstm.hidden),
                "filter_size": cfg.model.convlstm.kernel_size, "patch_size": cfg.model.patch_size}  # fmt: skip
    else:
        arch = {"num_hidden": "128,128,128,128", "filter_size": 5, "patch_size": 4}
    python = args.python or (
        "/tmp/openstl-venv/bin/python" if Path("/tmp/openstl-venv/bin/python").exists() else sys.executable
    )
    print(f"torch {torch.__version__} | {os.cpu_count()} CPU cores, {args.threads} torch thread(s) | load average "
          f"{os.getloadavg()[0]:.1f} | N = {args.steps} steps, batch {args.batch}")  # fmt: skip

    # ---- OpenSTL, in its own interpreter
    cmd = [python, str(Path(__file__).resolve()), "--worker", "--openstl", str(Path(args.openstl).resolve()),
           "--train", str(windows / "train.h5"), "--test", str(windows / "test.h5"), "--steps", str(args.steps),
           "--batch", str(args.batch), "--threads", str(args.threads), "--lr", str(args.lr), "--seed", str(args.seed),
           "--in-len", str(cfg.windows.in_len), "--out-len", str(cfg.windows.out_len), "--out", str(out),
           "--num-hidden", arch["num_hidden"], "--filter-size", str(arch["filter_size"]),
           "--patch-size", str(arch["patch_size"])]  # fmt: skip
    print(f"OpenSTL ConvLSTM ({python}): hidden {arch['num_hidden']}, filter {arch['filter_size']}, patch "
          f"{arch['patch_size']}, Adam lr {args.lr:g} onecycle, MSE on all next frames, scheduled sampling ...", flush=True)  # fmt: skip
    proc = subprocess.run(cmd, cwd="/tmp")
    if proc.returncode:
        print(f"the OpenSTL child failed (exit {proc.returncode})")
        return 1
    o = json.loads((out / "openstl.json").read_text())
    preds = np.load(out / "openstl_preds.npy")

    # ---- ours, through the pipeline's trainer
    ours = None
    if not args.skip_ours:
        from pipeline.sevir.dataset import WindowDataset

        n_train = len(WindowDataset(windows / "train.h5", cfg.windows.in_len, cfg.windows.out_len, raw=True))
        epochs, per_epoch = _epochs_for(args.steps, max(1, n_train // args.batch))
        _set_key(raw, "train.phase1.epochs", epochs)
        _set_key(raw, "train.phase1.max_steps_per_epoch", per_epoch)
        print(f"ours: pipeline.training.fit phase 1, convlstm, {epochs} epochs x {per_epoch} steps ...", flush=True)
        with tempfile.TemporaryDirectory(prefix="bench_public_trainer_") as tmp:
            _set_key(raw, "train.checkpoint_dir", tmp)
            cfg = config_mod.from_dict(raw, source="bench_public_trainer")
            t0 = time.perf_counter()
            result = fit(cfg, 1, Path(tmp) / "phase1", progress=False)
            wall = time.perf_counter() - t0
            train_s = sum(row["epoch_time_s"] for row in result.history)
            n_params = sum(p.numel() for p in models.build(cfg.model).parameters())
            forecaster = model_from_checkpoint(result.last_checkpoint, cfg.model, device="cpu")
            ours = {"fit_wall_s": wall, "train_s": train_s, "per_step_s": train_s / args.steps, "params": n_params,
                    "epochs": epochs, "steps_per_epoch": per_epoch,
                    "loss_last_epoch": result.history[-1].get("train.loss")}  # fmt: skip

    # ---- scoring: stage evaluate's loop over test.h5, every forecaster on the same batches
    test = evaluation.open_windows(windows / "test.h5", {"in_len": cfg.windows.in_len, "out_len": cfg.windows.out_len,
                                                        "height": preds.shape[-2], "width": preds.shape[-1]})  # fmt: skip
    forecasters = {}
    if ours is not None:
        forecasters["ours_convlstm"] = forecaster
    forecasters["openstl_convlstm"] = StoredForecaster(preds)
    forecasters["openstl_convlstm_clip01"] = StoredForecaster(preds, clip=True)
    forecasters["persistence"] = get_method("persistence")
    if args.with_flow:
        forecasters["optical_flow"] = get_method("optical_flow")
    if len(preds) != len(test):
        print(f"OpenSTL forecast {len(preds)} windows, the test split holds {len(test)}")
        return 1
    ev = evaluation.evaluate(test, forecasters, cfg.evaluate, device="cpu")
    sc = ev.scores
    pers = sc["persistence"]["csi_m"]

    def f(v, spec):
        return "-" if v is None else format(v, spec)

    o_step = statistics.median(o["step_wall_s"][1:] or o["step_wall_s"])
    print(f"\ntest split, {ev.windows} windows, after N = {args.steps} steps of batch {args.batch}")
    hdr = f"{'forecaster':<26} {'CSI-M':>7} {'HSS-M':>7} {'MSE':>8} {'SSIM':>7} {'/persist':>8} {'params':>8} {'s/step':>7}"
    print(hdr + "\n" + "-" * len(hdr))
    extra = {"ours_convlstm": (ours or {}).get("params"), "openstl_convlstm": o["params"]}
    steps = {"ours_convlstm": (ours or {}).get("per_step_s"), "openstl_convlstm": o_step}
    for name, s in sc.items():
        print(f"{name:<26} {f(s['csi_m'], '.4f'):>7} {f(s['hss_m'], '.4f'):>7} {f(s['mse'], '.5f'):>8} "
              f"{f(s.get('ssim'), '.4f'):>7} {f(s['csi_m'] / pers if s['csi_m'] is not None and pers else None, '.3f'):>8} "
              f"{extra.get(name) or '':>8} {f(steps.get(name), '.3f') if name in steps else '':>7}")  # fmt: skip
    print(f"OpenSTL: {o['train_s']:.1f} s training, median {o_step * 1000:.0f} ms/step (mean "
          f"{statistics.fmean(o['step_wall_s']) * 1000:.0f}), loss {o['loss_first10']:.4f} -> {o['loss_last10']:.4f} "
          f"(first / last 10 steps, MSE on the 0-1 scale), scheduled-sampling eta {o['final_eta']:.4f}")  # fmt: skip
    if ours is not None:
        mine, theirs = sc["ours_convlstm"], sc["openstl_convlstm"]
        print(f"ours: {ours['train_s']:.1f} s training ({ours['fit_wall_s']:.1f} s fit with validation and checkpoints), "
              f"{ours['per_step_s'] * 1000:.0f} ms/step")  # fmt: skip
        if mine["csi_m"] is not None and theirs["csi_m"]:
            print(f"ours / OpenSTL: CSI-M {mine['csi_m'] / theirs['csi_m']:.2f}x, MSE {mine['mse'] / theirs['mse']:.2f}x, "
                  f"time per step {ours['per_step_s'] / o_step:.2f}x")  # fmt: skip
    doc = {"argv": sys.argv[1:], "steps": args.steps, "batch": args.batch, "threads": args.threads, "arch": arch,
           "openstl": {k: v for k, v in o.items() if k != "step_wall_s"} | {"median_step_s": o_step}, "ours": ours,
           "scores": {n: {k: s.get(k) for k in ("csi_m", "hss_m", "mse", "mae", "ssim")} for n, s in sc.items()}}  # fmt: skip
    (out / "public_trainer.json").write_text(json.dumps(doc, indent=2, default=str))
    print(f"wrote {out / 'public_trainer.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
