"""Test skill against CPU training time: each model family trained by the real stages' code for a ladder of wall budgets.

    python benchmarks/bench_skill.py [--models convlstm,swinlstm,datswinlstm_memory] [--budgets 60,180,600]
        [--quick] [--set key=value ...] [--params params.yaml] [--windows data/windows] [--threads 2]
        [--calib-steps 3] [--out /tmp/bench_skill]
    make bench-skill ARGS="--quick --models convlstm"

For each model (``model.name``) and each budget B (seconds of wall time on this machine):

1. config: ``--params`` (params.yaml) with ``model.name`` set, then every ``--set key=value``
   (dotted key, YAML value: ``--set model.embed_dim=48 --set train.phase1.lr=3e-4``); the windows
   files are the already built ``--windows`` folder (read only), checkpoints go to a temporary
   folder, tracking is off, ``train.threads = --threads``, ``train.device = --device``.
2. calibration: after an untimed one-step warm-up of both phases, a short timed run of that
   config through :func:`pipeline.training.fit`, phase 1 then phase 2 from the phase-1 ``best.pt``
   (both with one epoch of ``--calib-steps`` steps): it gives each phase's seconds per step, per
   epoch (validation of ``train.val_max_batches`` batches + checkpoints) and per run (set-up).
3. training: both phases as the DVC stages run them (train_phase1, then train_phase2 from the
   phase-1 best; for the memory model phase 1 is memory learning with its alignment steps,
   phase 2 the frozen-memory steps; for the others phase 2 is fine-tuning). B is split between
   the phases in the proportion of their steps in the params (``epochs x max_steps_per_epoch``,
   0 = a whole epoch; params.yaml: 8 : 4), and each phase's ``epochs`` / ``max_steps_per_epoch``
   are set so that its predicted fit wall time fills its share: at least the params' epochs (one
   when their validations alone overrun the share), a new epoch whenever the steps exceed a whole
   pass over the train split, at least one step per epoch. The real wall time of the
   two ``fit`` calls is what the table reports (it drifts from B as far as the machine's load moves
   between calibration and training).
4. scoring: the phase-2 ``best.pt`` on the test split with stage evaluate's own code
   (:func:`pipeline.scoring.evaluation.evaluate` over ``open_windows`` of ``test.h5`` with
   ``forecasters.model_from_checkpoint``, the ``evaluate`` section of the config). Persistence and
   optical flow (``forecasters.get_method``) are scored once at the start, on the same windows.

Prints one row per (model, budget): real wall s, steps (phase 1 + phase 2), test CSI-M, HSS-M,
MSE, SSIM and the CSI-M ratio against persistence and against optical flow (a row whose training
stopped with a pipeline error is printed as failed and the run goes on; phase 2 refuses a phase-1
checkpoint made from other code, so leave models/ and pipeline/training/ unchanged while it runs). Writes
``<out>/skill.json`` (config, calibration, baselines, rows) and ``<out>/skill_curve.png`` (CSI-M
against real wall seconds, one line per model, the baselines as dashed lines). ``--out``
defaults to /tmp/bench_skill, outside the repository. ``--quick``: budgets 20,60 (unless
``--budgets`` is given) and 2 calibration steps. Training is timed in wall seconds, so on a shared
machine keep other jobs off the cores; load average is printed. No asserts.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODELS = ("convlstm", "swinlstm", "datswinlstm_memory")


def set_key(tree: dict[str, Any], key: str, value: Any) -> None:
    """``tree[a][b][c] = value`` for ``key`` "a.b.c" (missing sections are made)."""
    parts = key.split(".")
    for part in parts[:-1]:
        tree = tree.setdefault(part, {})
    tree[parts[-1]] = value


def get_key(tree: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        tree = tree[part]
    return tree


def base_params(args: argparse.Namespace) -> dict[str, Any]:
    """params.yaml with the bench's fixed settings and then the ``--set`` overrides."""
    import yaml

    raw = yaml.safe_load(Path(args.params).read_text())
    set_key(raw, "windows.root", str(Path(args.windows).resolve()))
    set_key(raw, "train.threads", args.threads)
    set_key(raw, "train.device", args.device)
    set_key(raw, "tracking.enabled", False)
    for item in args.set:
        if "=" not in item:
            raise SystemExit(f"--set {item!r}: expected key=value")
        key, value = item.split("=", 1)
        set_key(raw, key.strip(), yaml.safe_load(value))
    return raw


def make_config(raw: dict[str, Any], model: str, ckpt_dir: Path, phases: dict[int, tuple[int, int]]):
    """A Config for ``model`` with checkpoints under ``ckpt_dir`` and ``phases[p] = (epochs, max_steps)``."""
    from pipeline import config as config_mod

    raw = copy.deepcopy(raw)
    set_key(raw, "model.name", model)
    set_key(raw, "train.checkpoint_dir", str(ckpt_dir))
    for phase, (epochs, steps) in phases.items():
        set_key(raw, f"train.phase{phase}.epochs", int(epochs))
        set_key(raw, f"train.phase{phase}.max_steps_per_epoch", int(steps))
    return config_mod.from_dict(raw, source="bench_skill")


def train_both(cfg, ckpt_dir: Path) -> dict[str, Any]:
    """train_phase1 then train_phase2 (from the phase-1 best), as the stages run them; timings per phase."""
    from pipeline.training import fit

    out: dict[str, Any] = {"phases": {}}
    t_all = time.perf_counter()
    for phase in (1, 2):
        t0 = time.perf_counter()
        result = fit(cfg, phase, ckpt_dir / f"phase{phase}", init_checkpoint=ckpt_dir / "phase1" / "best.pt",
                     progress=False)  # fmt: skip
        wall = time.perf_counter() - t0
        hist = result.history
        train_s = sum(row["epoch_time_s"] for row in hist)
        val_s = sum(row.get("val_time_s", 0.0) for row in hist)
        ckpt_s = float(result.extra.get("checkpoint_s", 0.0))
        pcfg = cfg.train.phase(phase)
        steps = len(hist) * min(pcfg.max_steps_per_epoch or 10**9, steps_per_pass(cfg, result.batch_size))
        out["phases"][phase] = {"wall_s": wall, "train_s": train_s, "val_s": val_s, "checkpoint_s": ckpt_s,
                                "setup_s": wall - train_s - val_s - ckpt_s, "epochs": len(hist), "steps": steps,
                                "best_epoch": result.best_epoch, "best_score": result.best_score,
                                "best_key": result.best_key, "stopped_early": result.stopped_early}  # fmt: skip
    out["wall_s"] = time.perf_counter() - t_all
    out["checkpoint"] = ckpt_dir / "phase2" / "best.pt"
    return out


_PASS: dict[tuple[str, int], int] = {}


def steps_per_pass(cfg, batch_size: int) -> int:
    """Batches in one whole pass over the train split (the trainer drops the last short batch)."""
    from pipeline.sevir.dataset import WindowDataset

    path = Path(cfg.windows.root) / "train.h5"
    key = (str(path), batch_size)
    if key not in _PASS:
        n = len(WindowDataset(path, cfg.windows.in_len, cfg.windows.out_len, raw=True))
        _PASS[key] = max(1, n // batch_size) if n >= batch_size else 1
    return _PASS[key]


def default_steps(raw: dict[str, Any], phase: int, per_pass: int) -> tuple[int, int]:
    """(epochs, steps) of a phase in the params: epochs x steps per epoch (0 = a whole pass)."""
    p = get_key(raw, f"train.phase{phase}")
    epochs = int(p.get("epochs", 1))
    steps = int(p.get("max_steps_per_epoch", 0)) or per_pass
    return epochs, epochs * min(steps, per_pass)


def size_phase(share_s: float, cal: dict[str, float], min_epochs: int, per_pass: int) -> tuple[int, int, float]:
    """(epochs, steps per epoch, predicted s) filling ``share_s`` with wall = setup + steps*step + epochs*epoch_cost."""
    step_s, epoch_s, setup_s = cal["step_s"], cal["epoch_s"], cal["setup_s"]
    epochs = max(1, min_epochs)
    for _ in range(4):  # the epoch count depends on the steps and the steps on the epochs' cost
        n = max(epochs, int((share_s - setup_s - epochs * epoch_s) / step_s))
        epochs_new = max(1, min_epochs, math.ceil(n / per_pass))
        if epochs_new == epochs:
            break
        epochs = epochs_new
    epochs = min(epochs, max(1, n))
    per_epoch = max(1, min(per_pass, n // epochs))
    predicted = setup_s + epochs * (per_epoch * step_s + epoch_s)
    if predicted > share_s and min_epochs > 1:  # the params' epochs alone overrun the share: one epoch
        return size_phase(share_s, cal, 1, per_pass)
    return epochs, per_epoch, predicted


def calibrate(raw: dict[str, Any], model: str, steps: int, tmp: Path) -> dict[int, dict[str, float]]:
    """Per phase: seconds per step, per epoch (validation + checkpoints) and set-up, from one short run."""
    warm = Path(tempfile.mkdtemp(prefix=f"warmup_{model}_", dir=tmp))  # first calls (kernels, allocator): untimed
    train_both(make_config(raw, model, warm, {1: (1, 1), 2: (1, 1)}), warm)
    ckpt = Path(tempfile.mkdtemp(prefix=f"calib_{model}_", dir=tmp))
    cfg = make_config(raw, model, ckpt, {1: (1, steps), 2: (1, steps)})
    run = train_both(cfg, ckpt)
    cal = {}
    for phase, p in run["phases"].items():
        cal[phase] = {"step_s": p["train_s"] / max(1, p["steps"]), "epoch_s": (p["val_s"] + p["checkpoint_s"]) / p["epochs"],
                      "setup_s": max(0.0, p["setup_s"]), "steps": p["steps"], "wall_s": p["wall_s"]}  # fmt: skip
    return cal


def score(cfg, checkpoint: Path | None, baselines: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """Stage evaluate's scoring on the test split: the checkpoint's model, or the named baselines."""
    import h5py

    from pipeline.scoring import evaluation
    from pipeline.scoring.forecasters import get_method, model_from_checkpoint
    from pipeline.training.checkpoint import read_checkpoint

    path = Path(cfg.windows.root) / "test.h5"
    if checkpoint is not None:
        data = read_checkpoint(checkpoint)["data"]
        forecasters = {"model": model_from_checkpoint(checkpoint, cfg.model, device="cpu", precision="fp32")}
    else:
        with h5py.File(path, "r") as h5:
            height, width = (int(s) for s in h5["vil"].shape[2:])
        data = {"in_len": cfg.windows.in_len, "out_len": cfg.windows.out_len, "height": height, "width": width}
        forecasters = {name: get_method(name) for name in baselines or []}
    dataset = evaluation.open_windows(path, data)
    t0 = time.perf_counter()
    result = evaluation.evaluate(dataset, forecasters, cfg.evaluate, device="cpu")
    elapsed = time.perf_counter() - t0
    out = {}
    for name, s in result.scores.items():
        out[name] = {k: s.get(k) for k in ("csi_m", "hss_m", "mse", "ssim")}
        out[name]["windows"] = result.windows
    out["_eval_s"] = elapsed  # type: ignore[assignment]
    return out


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def plot(path: Path, rows: list[dict[str, Any]], baselines: dict[str, dict[str, Any]], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    markers = "osD^v"
    for i, model in enumerate(dict.fromkeys(r["model"] for r in rows)):
        pts = sorted((r["wall_s"], r["csi_m"]) for r in rows if r["model"] == model and r.get("csi_m") is not None)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=markers[i % len(markers)], label=model)
    styles = {"persistence": "tab:gray", "optical_flow": "tab:red"}
    for name, s in baselines.items():
        if s.get("csi_m") is not None:
            ax.axhline(s["csi_m"], linestyle="--", color=styles.get(name, "k"), label=f"{name} ({s['csi_m']:.3f})")
    ax.set_xlabel("training wall time, both phases (s, CPU)")
    ax.set_ylabel("test CSI-M")
    ax.set_title(title)
    walls = [r["wall_s"] for r in rows if "wall_s" in r]
    if walls and max(walls) / max(min(walls), 1e-9) > 8:
        ax.set_xscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--models", default=",".join(MODELS), help=f"comma-separated model.name values (default: {','.join(MODELS)})"
    )
    ap.add_argument(
        "--budgets", default=None, help="comma-separated wall budgets in seconds (default 60,180,600; --quick 20,60)"
    )
    ap.add_argument("--quick", action="store_true", help="budgets 20,60 and 2 calibration steps")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="params override (repeatable)")
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--windows", default=str(ROOT / "data" / "windows"), help="folder of train/val/test.h5 (read only)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (train.threads and scoring)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "auto", "cuda"), help="train.device (scoring is on CPU)")
    ap.add_argument(
        "--calib-steps", type=int, default=None, help="steps per phase of the calibration run (default 3; --quick 2)"
    )
    ap.add_argument("--out", default="/tmp/bench_skill", help="folder for skill.json and skill_curve.png")
    args = ap.parse_args(argv)
    budgets = [float(b) for b in (args.budgets or ("20,60" if args.quick else "60,180,600")).split(",") if b]
    calib_steps = args.calib_steps or (2 if args.quick else 3)
    model_names = [m.strip() for m in args.models.split(",") if m.strip()]

    import torch

    from pipeline.errors import PipelineError

    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    raw = base_params(args)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"torch {torch.__version__} | {os.cpu_count()} CPU cores, {args.threads} torch thread(s) | load average "
          f"{os.getloadavg()[0]:.1f} | models {', '.join(model_names)} | budgets {', '.join(f'{b:g}' for b in budgets)} s")  # fmt: skip
    if args.set:
        print(f"overrides: {' '.join(args.set)}")

    with tempfile.TemporaryDirectory(prefix="bench_skill_") as tmp_name:
        tmp = Path(tmp_name)
        cfg0 = make_config(raw, model_names[0] if model_names else MODELS[0], tmp / "unused", {})
        print(f"scoring the baselines on the test split ({', '.join(cfg0.evaluate.baselines)}) ...", flush=True)
        base = score(cfg0, None, list(cfg0.evaluate.baselines))
        base_eval_s = base.pop("_eval_s")
        for name, s in base.items():
            print(f"  {name:<14} CSI-M {fmt(s['csi_m'], '.4f')}  HSS-M {fmt(s['hss_m'], '.4f')}  MSE "
                  f"{fmt(s['mse'], '.5f')}  SSIM {fmt(s['ssim'], '.4f')}  ({s['windows']} windows)")  # fmt: skip
        print(f"  ({base_eval_s:.1f} s)")
        pers, flow = base.get("persistence", {}).get("csi_m"), base.get("optical_flow", {}).get("csi_m")

        rows: list[dict[str, Any]] = []
        calibration: dict[str, Any] = {}
        for model in model_names:
            cfg_m = make_config(raw, model, tmp / "unused", {})
            bs = 4 if cfg_m.train.batch_size == "auto" and args.device == "cpu" else cfg_m.train.batch_size
            per_pass = steps_per_pass(cfg_m, int(bs) if bs != "auto" else 4)
            d1, d2 = default_steps(raw, 1, per_pass), default_steps(raw, 2, per_pass)
            frac1 = d1[1] / (d1[1] + d2[1])
            print(f"\n{model}: calibrating ({calib_steps} steps per phase) ...", flush=True)
            cal = calibrate(raw, model, calib_steps, tmp)
            calibration[model] = cal
            for phase in (1, 2):
                c = cal[phase]
                print(f"  phase {phase}: {c['step_s']:.2f} s/step, {c['epoch_s']:.2f} s/epoch (validation + checkpoints), "
                      f"{c['setup_s']:.2f} s set-up")  # fmt: skip
            for budget in budgets:
                e1, s1, p1 = size_phase(budget * frac1, cal[1], d1[0], per_pass)
                e2, s2, p2 = size_phase(budget * (1 - frac1), cal[2], d2[0], per_pass)
                ckpt = Path(tempfile.mkdtemp(prefix=f"{model}_{budget:g}_", dir=tmp))
                cfg = make_config(raw, model, ckpt, {1: (e1, s1), 2: (e2, s2)})
                print(f"  budget {budget:g} s: phase 1 {e1} x {s1} steps, phase 2 {e2} x {s2} steps (predicted "
                      f"{p1 + p2:.0f} s) ...", flush=True)  # fmt: skip
                try:
                    run = train_both(cfg, ckpt)
                except PipelineError as err:  # e.g. the working tree's code changed between the phases
                    print(f"    failed: {str(err).splitlines()[0][:300]}")
                    rows.append({"model": model, "budget_s": budget, "error": str(err).splitlines()[0]})
                    continue
                sc = score(cfg, run["checkpoint"])
                m = sc["model"]
                ph = run["phases"]
                row = {"model": model, "budget_s": budget, "wall_s": run["wall_s"], "predicted_s": p1 + p2,
                       "steps": ph[1]["steps"] + ph[2]["steps"], "steps_phase1": ph[1]["steps"],
                       "steps_phase2": ph[2]["steps"], "epochs": [ph[1]["epochs"], ph[2]["epochs"]],
                       "train_s": ph[1]["train_s"] + ph[2]["train_s"], "val_s": ph[1]["val_s"] + ph[2]["val_s"],
                       "csi_m": m["csi_m"], "hss_m": m["hss_m"], "mse": m["mse"], "ssim": m["ssim"],
                       "csi_m_vs_persistence": ratio(m["csi_m"], pers), "csi_m_vs_optical_flow": ratio(m["csi_m"], flow),
                       "best_epoch": [ph[1]["best_epoch"], ph[2]["best_epoch"]], "windows": m["windows"],
                       "eval_s": sc["_eval_s"], "load_avg": os.getloadavg()[0]}  # fmt: skip
                rows.append(row)
                print(f"    wall {row['wall_s']:.1f} s ({row['wall_s'] / budget:.2f}x budget), CSI-M {fmt(row['csi_m'], '.4f')}"
                      f", {fmt(row['csi_m_vs_persistence'], '.3f')}x persistence", flush=True)  # fmt: skip

    hdr = (f"{'model':<20} {'budget s':>8} {'wall s':>8} {'steps':>9} {'CSI-M':>7} {'HSS-M':>7} {'MSE':>8} {'SSIM':>7} "
           f"{'/persist':>8} {'/flow':>7}")  # fmt: skip
    print("\n" + hdr + "\n" + "-" * len(hdr))
    for name, s in base.items():
        print(f"{name:<20} {'-':>8} {'-':>8} {'-':>9} {fmt(s['csi_m'], '.4f'):>7} {fmt(s['hss_m'], '.4f'):>7} "
              f"{fmt(s['mse'], '.5f'):>8} {fmt(s['ssim'], '.4f'):>7} {fmt(ratio(s['csi_m'], pers), '.3f'):>8} "
              f"{fmt(ratio(s['csi_m'], flow), '.3f'):>7}")  # fmt: skip
    for r in rows:
        if "error" in r:
            print(f"{r['model']:<20} {r['budget_s']:>8g} failed: {r['error'][:80]}")
            continue
        steps = f"{r['steps_phase1']}+{r['steps_phase2']}"
        print(f"{r['model']:<20} {r['budget_s']:>8g} {r['wall_s']:>8.1f} {steps:>9} {fmt(r['csi_m'], '.4f'):>7} "
              f"{fmt(r['hss_m'], '.4f'):>7} {fmt(r['mse'], '.5f'):>8} {fmt(r['ssim'], '.4f'):>7} "
              f"{fmt(r['csi_m_vs_persistence'], '.3f'):>8} {fmt(r['csi_m_vs_optical_flow'], '.3f'):>7}")  # fmt: skip
    print("steps: phase 1 + phase 2 batches (a memory-model phase-1 step is a phase-1 and an alignment update); "
          "wall: both fit calls, validation and checkpoints included")  # fmt: skip

    doc = {"argv": sys.argv[1:], "budgets_s": budgets, "threads": args.threads, "overrides": args.set,
           "torch": torch.__version__, "cpu_count": os.cpu_count(), "baselines": base, "baseline_eval_s": base_eval_s,
           "calibration": calibration, "rows": rows}  # fmt: skip
    json_path, png_path = out_dir / "skill.json", out_dir / "skill_curve.png"
    json_path.write_text(json.dumps(doc, indent=2, default=str))
    title = f"test CSI-M against CPU training time ({os.cpu_count()} cores, {args.threads} threads, {next((r['windows'] for r in rows if 'windows' in r), 0)} test windows)"
    plot(png_path, rows, base, title)
    print(f"wrote {json_path} and {png_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
