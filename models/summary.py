"""Parameter counts of every registered model at the params.yaml config.

    python -m models.summary [--params params.yaml] [--markdown models/PARAMS.md]

Builds each model from the ``model`` section of the params file with only
``model.name`` changed, and prints one Markdown table row per model: total
parameters, those trained in phase 1 only (the memory bank) and the rest.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import models
from models.config import ModelConfig


def count_parameters(cfg: ModelConfig) -> dict[str, int]:
    """{'total', 'memory', 'phase2'} parameter counts of the model ``cfg`` builds."""
    torch.manual_seed(0)
    model = models.build(cfg)
    total = sum(p.numel() for p in model.parameters())
    memory = sum(p.numel() for p in model.memory_parameters())
    return {"total": total, "memory": memory, "phase2": total - memory}


def table(cfg: ModelConfig) -> str:
    """A Markdown table of parameter counts, one row per registered model, at ``cfg`` with only the name changed."""
    lines = [
        "| model | parameters | memory bank (phase 1 only) | trained in phase 2 |",
        "|---|---:|---:|---:|",
    ]
    for name in models.available():
        counts = count_parameters(cfg.model_copy(update={"name": name}))
        lines.append(f"| {name} | {counts['total']:,} | {counts['memory']:,} | {counts['phase2']:,} |")
    return "\n".join(lines)


def describe(cfg: ModelConfig, params: Path) -> str:
    """One line naming the config the counts are for."""
    return (
        f"At `{params}`: embed_dim {cfg.embed_dim}, patch_size {cfg.patch_size}, window_size {cfg.window_size}, "
        f"depths_down {cfg.depths_down}, depths_up {cfg.depths_up}, heads {cfg.heads}, "
        f"convlstm.hidden {cfg.convlstm.hidden}, memory {cfg.memory.slots} x {cfg.memory.dim}."
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file (default: params.yaml)")
    parser.add_argument("--markdown", type=Path, default=None, help="also write the table to this Markdown file")
    args = parser.parse_args(argv)

    from pipeline.config import load  # the one reader of params.yaml
    from pipeline.errors import PipelineError

    try:
        cfg = load(args.params).model
    except PipelineError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    text = f"{describe(cfg, args.params)}\n\n{table(cfg)}\n"
    print(text, end="")
    if args.markdown is not None:
        args.markdown.write_text(
            f"# Model sizes\n\nWritten by `python -m models.summary --markdown {args.markdown}`.\n\n{text}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
