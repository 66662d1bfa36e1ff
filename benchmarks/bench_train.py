"""Training stage throughput against the pure model step: what the loader, logging and checkpoints cost.

    python benchmarks/bench_train.py [--model NAME] [--size 128] [--batch 4] [--steps 8] [--epochs 2]
        [--phase 2] [--threads 1] [--device cpu|cuda] [--events 24] [--no-bench-models]

Three figures at one config (the ``model`` section of params.yaml, ``windows.in_len/out_len``,
frames ``--size``, batch ``--batch``), in this order, each as samples/s:

1. ``bench_models.py`` step (run as a child process, same model, shapes, batch, threads, phase):
   forward + MSE + backward on random frames already on the device, no optimiser step.
2. pure training step, in this process: the trainer's step without the stage around it -- the
   configured loss (L1 + MSE), backward, grad clipping, AdamW step, scheduler step, on batches
   already on the device (phase 1 of a memory model: both the phase-1 and the alignment step).
3. the stage: :func:`pipeline.training.fit` on a generated sample chunked to windows, with MLflow
   logging into a temporary store: DataLoader reads (uint8) -> device -> /255 -> the same step,
   device-side loss sums, the progress bar, per-epoch checkpoints (last + best) and MLflow calls.
   Validation is timed and left out (it is work, not overhead; ``val_max_batches: 1``), as is the
   one-off set-up (model build, file opening).

Headline: overhead = time per sample of (3) / time per sample of (2) - 1; the target is <= 10 %.
(3) vs (1) is printed too; it also holds the optimiser step that (1) leaves out. Wall-clock and
process CPU time are both given: on a shared machine CPU time is the steadier of the two.
Measurements (2) and (3) alternate ``--repeats`` times; the medians are reported. No asserts.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _config(args: argparse.Namespace, root: Path, phase_epochs: int, steps: int):
    import yaml

    from pipeline import config

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    model = params["model"]
    if args.model:
        model["name"] = args.model
    phase = {"epochs": phase_epochs, "max_steps_per_epoch": steps, "warmup_frac": 0.1}
    raw = {
        "data": {"root": str(root / "raw"), "synthetic": {"n_events": args.events, "size": args.size, "frames": 49,
                                                         "events_per_file": args.events}},
        "windows": {**params["windows"], "root": str(root / "windows")},
        "model": model,
        "train": {"device": args.device, "precision": "fp32", "batch_size": args.batch, "threads": args.threads,
                  "checkpoint_dir": str(root / "artifacts"), "val_max_batches": 1, "log_every": 10,
                  "phase1": dict(phase), "phase2": dict(phase)},
        "tracking": {"enabled": True, "uri": f"sqlite:///{root / 'mlflow.db'}"},
    }  # fmt: skip
    return config.from_dict(raw, source="bench_train")


def _prepare(args: argparse.Namespace, root: Path) -> None:
    from pipeline.sevir.synthetic import generate
    from pipeline.sevir.windows import write_windows

    cfg = _config(args, root, 1, 1)
    generate(cfg.data.root, cfg.data.synthetic, seed=0, progress=False)
    write_windows(cfg.data.root, cfg.windows, cfg.data.split, stats_path=root / "chunk_stats.json")
    if args.phase == 2:  # phase 2 starts from a phase-1 checkpoint: one untimed step of phase 1
        from pipeline.training import fit

        fit(cfg, 1, root / "artifacts" / "phase1", progress=False)


def _pure_step_time(args: argparse.Namespace, root: Path) -> tuple[float, float, int]:
    """Median (wall s, cpu s) per batch of the trainer's step on device-resident batches; steps timed."""
    import torch

    from pipeline.training.data import to_device
    from pipeline.training.loop import Trainer

    cfg = _config(args, root, args.epochs, args.steps)
    out = root / f"pure{time.monotonic_ns()}"
    trainer = Trainer(cfg, args.phase, out, init_checkpoint=root / "artifacts" / "phase1" / "best.pt", progress=False)
    loader = iter(trainer.train_loader)
    batches = [to_device(next(loader), trainer.device) for _ in range(min(args.steps, trainer.steps_per_epoch))]
    model = trainer.train_model
    model.train()
    walls, cpus = [], []
    for rep in range(args.epochs * len(batches) + 1):
        batch = batches[rep % len(batches)]
        if trainer.device.type == "cuda":
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        if trainer.two_step:
            loss, _, _ = trainer._forward_loss(model, batch, 1)
            trainer._backward_step(loss, sync=True, last_micro=True)
            if trainer.pcfg.align:
                loss, _, _ = trainer._forward_loss(model, batch, 2)
                trainer._backward_step(loss, sync=True, last_micro=True)
        else:
            loss, _, _ = trainer._forward_loss(model, batch, 2)
            trainer._backward_step(loss, sync=True, last_micro=True)
        trainer.scheduler.step()
        if trainer.device.type == "cuda":
            torch.cuda.synchronize()
        if rep:  # the first step warms up
            walls.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
    batch_size = trainer.batch_size
    trainer.close()
    return statistics.median(walls), statistics.median(cpus), batch_size


def _stage_time(args: argparse.Namespace, root: Path) -> dict[str, float]:
    """fit() with MLflow: per-batch wall and CPU time of the training epochs plus checkpoints."""
    import mlflow

    from pipeline.training import fit

    cfg = _config(args, root, args.epochs, args.steps)
    out = root / f"stage{time.monotonic_ns()}"
    mlflow.set_tracking_uri(cfg.tracking.uri)
    mlflow.set_experiment("bench_train")
    c0, t0 = time.process_time(), time.perf_counter()
    with mlflow.start_run(run_name=f"train_phase{args.phase}"):
        result = fit(cfg, args.phase, out, tracker=mlflow, init_checkpoint=root / "artifacts" / "phase1" / "best.pt",
                     progress=True)  # fmt: skip
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    train_s = sum(row["epoch_time_s"] for row in result.history)
    val_s = sum(row["val_time_s"] for row in result.history)
    train_cpu_s = sum(row["epoch_cpu_s"] for row in result.history)
    ckpt_s, ckpt_cpu_s = result.extra["checkpoint_s"], result.extra["checkpoint_cpu_s"]
    steps = sum(1 for _ in range(args.epochs * args.steps))
    return {"train_s": train_s, "val_s": val_s, "checkpoint_s": ckpt_s, "fit_wall_s": wall, "fit_cpu_s": cpu,
            "steps": steps, "per_step_s": (train_s + ckpt_s) / steps, "per_step_cpu_s": (train_cpu_s + ckpt_cpu_s) / steps,
            "setup_and_logging_s": wall - train_s - val_s - ckpt_s}  # fmt: skip


def _bench_models(args: argparse.Namespace, model_name: str) -> tuple[float, float] | None:
    """The bench_models.py step (fwd + bwd): median (wall s, CPU s) at the same config, or None."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bm.json"
        cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_models.py"), "--models", model_name, "--device",
               args.device if args.device != "auto" else "cpu", "--size", str(args.size), "--batch", str(args.batch),
               "--in-len", str(args.in_len), "--out-len", str(args.out_len), "--threads", str(args.threads),
               "--phase", str(args.phase), "--steps", str(max(3, args.steps)), "--warmup", "1",
               "--variants", "fp32", "--no-compile", "--json", str(out)]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if proc.returncode or not out.exists():
            print(f"bench_models.py failed: {(proc.stderr or proc.stdout).strip().splitlines()[-1:]}")
            return None
        rows = json.loads(out.read_text())
        rows = rows.get("results", rows) if isinstance(rows, dict) else rows
        for row in rows:
            if isinstance(row, dict) and row.get("median_s"):
                return float(row["median_s"]), float(row.get("median_cpu_s", row["median_s"]))
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model.name (default: params.yaml)")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=6, help="batches per epoch")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--phase", type=int, choices=(1, 2), default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    ap.add_argument("--events", type=int, default=24, help="events in the generated sample")
    ap.add_argument("--repeats", type=int, default=2, help="alternating (pure, stage) measurement pairs")
    ap.add_argument("--no-bench-models", action="store_true", help="skip the bench_models.py child")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    import logging

    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        root = Path(tmp)
        cfg = _config(args, root, 1, 1)
        args.in_len, args.out_len = cfg.windows.in_len, cfg.windows.out_len
        print(f"torch {torch.__version__} | {os.cpu_count()} CPU cores, {args.threads} torch thread(s) | "
              f"load average {os.getloadavg()[0]:.1f}")  # fmt: skip
        print(f"config: model {cfg.model.name}, {args.size}x{args.size}, {args.in_len} -> {args.out_len}, batch "
              f"{args.batch}, phase {args.phase}, {args.epochs} epochs x {args.steps} steps, device {args.device}")  # fmt: skip
        _prepare(args, root)
        pure, stage = [], []
        for _ in range(args.repeats):
            pure.append(_pure_step_time(args, root))
            stage.append(_stage_time(args, root))
        bm = None if args.no_bench_models else _bench_models(args, cfg.model.name)

    pure_wall = statistics.median(p[0] for p in pure)
    pure_cpu = statistics.median(p[1] for p in pure)
    st = {k: statistics.median(s[k] for s in stage) for k in stage[0]}
    B = args.batch

    def line(label: str, wall: float, cpu: float) -> None:
        print(
            f"{label:<40}: {wall * 1000:8.1f} ms/batch wall ({B / wall:6.2f} samples/s) | "
            f"{cpu * 1000:8.1f} ms/batch CPU ({B / cpu:6.2f} samples/s)"
        )

    print()
    if bm is not None:
        line("(1) bench_models.py step (fwd+bwd)", *bm)
    line("(2) pure training step (+clip, AdamW)", pure_wall, pure_cpu)
    line("(3) stage: loader+step+logging+ckpt", st["per_step_s"], st["per_step_cpu_s"])
    print(f"    checkpoints {st['checkpoint_s']:.2f} s over {args.epochs} epochs (counted); validation "
          f"{st['val_s']:.2f} s and set-up/MLflow start {st['setup_and_logging_s']:.2f} s (not counted)")  # fmt: skip
    print(f"overhead of the stage vs the pure training step: wall {(st['per_step_s'] / pure_wall - 1) * 100:+.1f} %, "
          f"CPU {(st['per_step_cpu_s'] / pure_cpu - 1) * 100:+.1f} %  (target <= +10 %)")  # fmt: skip
    if bm is not None:
        print(f"stage vs bench_models step: wall {st['per_step_s'] / bm[0]:.2f}x, CPU {st['per_step_cpu_s'] / bm[1]:.2f}x "
              f"time per batch ({'two optimiser steps per batch; ' if args.phase == 1 else ''}"
              "the stage adds the optimiser step and clipping)")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
