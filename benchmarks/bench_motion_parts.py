"""Which part of a ``model.motion`` checkpoint's output holds its skill: the flow or the intensity change.

    python benchmarks/bench_motion_parts.py artifacts/phase2/best.pt [more checkpoints ...]

Each checkpoint is scored on the test windows (stage evaluate's code and params.yaml's ``evaluate``
block) four ways: as trained; with its change switched off (flow only); with its learned flow switched
off (the prior's flow and the learned change); and with both off (the prior alone, ``model.prior``).
A part is switched off by setting its output gain on the model's flow head to 0
(:class:`models.motion.FlowHead`, ``FLOW_SCALE`` / ``CHANGE_SCALE``), so nothing is retrained.
Prints CSI-M, HSS-M, MSE and SSIM per variant; read only (nothing is written).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = {  # name -> (flow gain, change gain) as multiples of the trained gains
    "as trained": (1.0, 1.0),
    "flow only (change off)": (1.0, 0.0),
    "change only (learned flow off)": (0.0, 1.0),
    "prior alone (both off)": (0.0, 0.0),
}


def flow_head(model):
    """The motion output layer of any model of the zoo, or None when ``model.motion`` is off."""
    head = getattr(model, "flow_head", None)
    if head is None and hasattr(model, "backbone"):
        head = getattr(model.backbone, "flow_head", None)
    return head


def main(argv: list[str] | None = None) -> int:
    import torch

    from pipeline import config as config_mod
    from pipeline.scoring import evaluation
    from pipeline.scoring.forecasters import model_from_checkpoint

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoints", nargs="+", type=Path)
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--windows", default=None, help="folder of test.h5 (default: params' windows.root)")
    ap.add_argument("--split", default="test", choices=["val", "test"])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = config_mod.load(Path(args.params))
    path = Path(args.windows or cfg.windows.root) / f"{args.split}.h5"
    for ckpt in args.checkpoints:
        forecaster = model_from_checkpoint(ckpt)  # the network and the data shape it was trained on
        model = forecaster.model
        head = flow_head(model)
        if head is None:
            print(f"{ckpt}: model.motion is off in this checkpoint; it has no flow and change to split")
            return 1
        trained = (head.FLOW_SCALE, head.CHANGE_SCALE)
        dataset = evaluation.open_windows(path, forecaster.data)
        print(f"\n{ckpt} ({model.cfg.name}, {args.split}: {len(dataset)} windows)")
        print(f"{'variant':34s} {'CSI-M':>7s} {'HSS-M':>7s} {'MSE':>9s} {'SSIM':>6s}")
        for name, (flow, change) in VARIANTS.items():
            head.FLOW_SCALE, head.CHANGE_SCALE = trained[0] * flow, trained[1] * change  # instance attributes
            t0 = time.perf_counter()
            s = evaluation.evaluate(dataset, {"model": forecaster}, cfg.evaluate).scores["model"]
            print(f"{name:34s} {s['csi_m']:7.4f} {s['hss_m']:7.4f} {s['mse']:9.5f} {s['ssim']:6.3f}"
                  f"   ({time.perf_counter() - t0:.0f} s)", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TQDM_DISABLE", "1")  # before tqdm is imported: its bars would break the table
    sys.exit(main())
