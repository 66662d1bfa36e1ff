"""Which memory-model options learn better on the sample: the same small budget for each option pair.

    python benchmarks/bench_memory_options.py [--fixed-batch] [--steps 150] [--seeds 0,1] [--threads 1]
        [--variants default,memory.read=cosine,memory.fusion=gated,skips=true] [--json out.json]

Data: events from the embedded sample's own field generator (pipeline.sevir._fields.render_event,
the radar-like VIL the fetch stage writes; 70% storm events as params.yaml's sample) rendered at the
sample's 128 x 128, each cut to one random ``--crop`` (32) window so storms keep their scale; a
training set and a held-out validation set from other seeds. Model: the default
``datswinlstm_memory`` options with the reference's skip-free layout (``skips: false``) at a small
size (patch 4, embed 16, window 2, depths [2, 1] / [1, 2], heads [2, 4], memory 16 x 32), one option
changed per variant. Training: AdamW, per batch a phase-1
step (long clip = inputs + targets) then a phase-2 step, loss L1 + MSE, ``--steps`` batches; with
``--fixed-batch`` always the same ``--batch`` clips (how fast each option fits one fixed clip
batch, the cheapest discriminating budget on a CPU). Reported: ``fit L1`` (the inference path,
phase 2, on the training batch), validation L1 / MSE and CSI at VIL 16 and 74 (pred x 255 >=
threshold), persistence and all-zero baselines, the mean over ``--seeds`` and the ratio of fit L1
to the ``default`` variant. No asserts: it reports.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

import models
from models.config import ModelConfig
from pipeline.sevir._fields import render_event

SMALL = dict(
    name="datswinlstm_memory",
    embed_dim=16,
    patch_size=4,
    window_size=2,
    depths_down=[2, 1],
    depths_up=[1, 2],
    heads=[2, 4],
    drop_path=0.0,
    skips=False,  # the base is the reference's layout; the skips=true variant measures our addition
    memory={"slots": 16, "dim": 32, "heads": 4},
)


def variant_config(variant: str) -> ModelConfig:
    """'default' or 'key=value[;key=value]' with dotted keys under model (e.g. memory.read=cosine)."""
    section = json.loads(json.dumps(SMALL))
    if variant != "default":
        for pair in variant.split(";"):
            key, value = pair.split("=", 1)
            node = section
            *parents, leaf = key.split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = {"true": True, "false": False}.get(value, value)
    return ModelConfig(**section)


def clips(n: int, seed: int, size: int, frames: int, crop: int) -> torch.Tensor:
    """(n, frames, 1, crop, crop) on 0-1: events of the sample's generator at ``size`` (70% storm events),
    each cut to one random ``crop`` x ``crop`` window (the storms keep their physical scale)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        event_rng = np.random.default_rng([seed, i])
        vil = render_event(event_rng, size, frames, storm=bool(rng.random() < 0.7))  # (size, size, T)
        r, c = rng.integers(0, size - crop + 1, size=2)
        out.append(vil[r : r + crop, c : c + crop])
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2)[:, :, None].float() / 255.0


def csi(pred: torch.Tensor, target: torch.Tensor, threshold: int) -> float:
    p, t = pred * 255 >= threshold, target * 255 >= threshold
    hits = (p & t).sum().item()
    union = (p | t).sum().item()
    return hits / union if union else float("nan")


def run(variant: str, seed: int, args: argparse.Namespace, train: torch.Tensor, val: torch.Tensor) -> dict:
    torch.manual_seed(seed)
    model = models.build(variant_config(variant))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    T = args.in_len
    start = time.perf_counter()
    model.train()
    curve = []
    for step in range(args.steps):
        if args.fixed_batch:  # learning one fixed clip batch: how fast each option fits the same data
            batch = train[: args.batch]
        else:
            batch = train[torch.randint(0, train.shape[0], (args.batch,), generator=gen)]
        x, y = batch[:, :T], batch[:, T:]
        for phase in (1, 2):
            pred = model(x, args.out_len, memory_x=batch, phase=phase)
            loss = (pred - y).abs().mean() + (pred - y).pow(2).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if step % max(args.steps // 5, 1) == 0 or step == args.steps - 1:
            curve.append(round(loss.item(), 4))  # the phase-2 (inference-path) training loss
    seconds = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(val[i : i + 8, :T], args.out_len) for i in range(0, val.shape[0], 8)])
    y = val[:, T:]
    fixed = train[: args.batch]
    with torch.no_grad():
        fit_l1 = (model(fixed[:, :T], args.out_len) - fixed[:, T:]).abs().mean().item()
    return dict(
        fit_l1=fit_l1,
        variant=variant,
        seed=seed,
        l1=(pred - y).abs().mean().item(),
        mse=(pred - y).pow(2).mean().item(),
        csi16=csi(pred, y, 16),
        csi74=csi(pred, y, 74),
        train_s=seconds,
        train_curve=curve,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--size", type=int, default=128, help="events rendered at this side (the sample's 128)")
    ap.add_argument("--crop", type=int, default=32, help="each clip is a random crop x crop window of its event")
    ap.add_argument("--in-len", type=int, default=3)
    ap.add_argument("--out-len", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--variants", default="default,memory.read=cosine,memory.fusion=gated,skips=true")
    ap.add_argument("--fixed-batch", action="store_true", help="train on the first --batch clips only (fit speed)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    frames = args.in_len + args.out_len
    train, val = clips(64, 1000, args.size, frames, args.crop), clips(24, 2000, args.size, frames, args.crop)
    print(f"torch {torch.__version__}, {args.threads} thread(s); {args.steps} steps x batch {args.batch}, "
          f"{args.crop}x{args.crop} crops of {args.size}x{args.size} events, {args.in_len} in / {args.out_len} out; train {tuple(train.shape)} "
          f"({(train == 0).float().mean():.0%} zeros), val {tuple(val.shape)}")  # fmt: skip
    y_val, last = val[:, args.in_len :], val[:, args.in_len - 1 : args.in_len].expand_as(val[:, args.in_len :])
    print(f"baselines on val: persistence L1 {(last - y_val).abs().mean():.4f} MSE {(last - y_val).pow(2).mean():.5f} "
          f"CSI16 {csi(last, y_val, 16):.3f} CSI74 {csi(last, y_val, 74):.3f}; zeros L1 {y_val.abs().mean():.4f}")  # fmt: skip
    rows = []
    for variant in args.variants.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            row = run(variant, seed, args, train, val)
            rows.append(row)
            print(f"  {variant:28s} seed {seed}: fit L1 {row['fit_l1']:.4f}  val L1 {row['l1']:.4f}  MSE {row['mse']:.5f}  "
                  f"CSI16 {row['csi16']:.3f}  CSI74 {row['csi74']:.3f}  ({row['train_s']:.0f} s; train loss "
                  f"{row['train_curve']})", flush=True)  # fmt: skip
    print(
        f"\n{'variant':28s} {'fit L1':>8s} {'val L1':>8s} {'val MSE':>9s} {'CSI16':>6s} {'CSI74':>6s}  fit L1 vs default"
    )
    means = {}
    for variant in args.variants.split(","):
        mine = [r for r in rows if r["variant"] == variant]
        means[variant] = {k: statistics.mean(r[k] for r in mine) for k in ("fit_l1", "l1", "mse", "csi16", "csi74")}
    base = means.get("default", next(iter(means.values())))
    for variant, m in means.items():
        print(f"{variant:28s} {m['fit_l1']:8.4f} {m['l1']:8.4f} {m['mse']:9.5f} {m['csi16']:6.3f} {m['csi74']:6.3f}  "
              f"{m['fit_l1'] / base['fit_l1']:.3f}")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows, "means": means}, f, indent=1)


if __name__ == "__main__":
    main()
