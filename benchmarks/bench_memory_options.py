"""Which memory-model options learn better on the sample: the same small budget for each option pair.

    python benchmarks/bench_memory_options.py [--steps 40] [--seeds 0,1] [--size 64] [--threads 1]
        [--variants default,read=cosine,fusion=gated,skips=true] [--json out.json]

Data: clips from the embedded sample's own field generator (pipeline.sevir._fields.render_event,
the same radar-like VIL the fetch stage writes; 70% storm events as params.yaml's sample), rendered
at ``--size`` (the training set and a held-out validation set from different seeds). Model: the
default ``datswinlstm_memory`` options at a small size (patch 4, embed 16, window 2, depths
[2, 1] / [1, 2], heads [2, 4], memory 16 x 32), with one option changed per variant. Training:
AdamW, per batch a phase-1 step (long clip = inputs + targets) then a phase-2 step, loss
L1 + MSE, ``--steps`` batches. Reported: validation L1 / MSE of the inference path (phase 2) and
CSI at VIL 16 and 74 (pred x 255 >= threshold), mean over ``--seeds``; and the ratio to the
``default`` variant. No asserts: it reports.
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


def clips(n: int, seed: int, size: int, frames: int) -> torch.Tensor:
    """(n, frames, 1, size, size) on 0-1 from the sample's generator; 70% storm events."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        event_rng = np.random.default_rng([seed, i])
        out.append(render_event(event_rng, size, frames, storm=bool(rng.random() < 0.7)))
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
    for _ in range(args.steps):
        idx = torch.randint(0, train.shape[0], (args.batch,), generator=gen)
        batch = train[idx]
        x, y = batch[:, :T], batch[:, T:]
        for phase in (1, 2):
            pred = model(x, args.out_len, memory_x=batch, phase=phase)
            loss = (pred - y).abs().mean() + (pred - y).pow(2).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    seconds = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(val[i : i + 4, :T], args.out_len) for i in range(0, val.shape[0], 4)])
    y = val[:, T:]
    return dict(
        variant=variant,
        seed=seed,
        l1=(pred - y).abs().mean().item(),
        mse=(pred - y).pow(2).mean().item(),
        csi16=csi(pred, y, 16),
        csi74=csi(pred, y, 74),
        train_s=seconds,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--in-len", type=int, default=4)
    ap.add_argument("--out-len", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--variants", default="default,memory.read=cosine,memory.fusion=gated,skips=true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    frames = args.in_len + args.out_len
    train, val = clips(32, 1000, args.size, frames), clips(12, 2000, args.size, frames)
    print(f"torch {torch.__version__}, {args.threads} thread(s); {args.steps} steps x batch {args.batch}, "
          f"{args.size}x{args.size}, {args.in_len} in / {args.out_len} out; train {tuple(train.shape)} "
          f"({(train == 0).float().mean():.0%} zeros), val {tuple(val.shape)}")  # fmt: skip
    rows = []
    for variant in args.variants.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            row = run(variant, seed, args, train, val)
            rows.append(row)
            print(f"  {variant:28s} seed {seed}: val L1 {row['l1']:.4f}  MSE {row['mse']:.5f}  "
                  f"CSI16 {row['csi16']:.3f}  CSI74 {row['csi74']:.3f}  ({row['train_s']:.0f} s)", flush=True)  # fmt: skip
    print(f"\n{'variant':28s} {'val L1':>8s} {'val MSE':>9s} {'CSI16':>6s} {'CSI74':>6s}  L1 vs default")
    means = {}
    for variant in args.variants.split(","):
        mine = [r for r in rows if r["variant"] == variant]
        means[variant] = {k: statistics.mean(r[k] for r in mine) for k in ("l1", "mse", "csi16", "csi74")}
    base = means.get("default", next(iter(means.values())))
    for variant, m in means.items():
        print(f"{variant:28s} {m['l1']:8.4f} {m['mse']:9.5f} {m['csi16']:6.3f} {m['csi74']:6.3f}  "
              f"{m['l1'] / base['l1']:.3f}")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows, "means": means}, f, indent=1)


if __name__ == "__main__":
    main()
