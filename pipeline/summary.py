"""Parameter counts of every registered model at the params.yaml config (the pipeline side of models.summary).

    python -m pipeline.summary [--params params.yaml] [--preset presets/x.yaml] [--markdown models/PARAMS.md]

Reads ``--params`` through pipeline.config (with ``--preset`` merged over it by
:func:`pipeline.preset.preset_config`, as ``python -m pipeline.preset`` applies it), then prints
:func:`models.summary.report`. ``python -m models.summary --preset`` gives the same config.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from models.summary import report
from pipeline.cli import run_stage
from pipeline.config import load
from pipeline.preset import preset_config


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file (default: params.yaml)")
    parser.add_argument("--preset", type=Path, default=None, help="a presets/*.yaml file merged over the params")
    parser.add_argument("--markdown", type=Path, default=None, help="also write the table to this Markdown file")
    args = parser.parse_args(argv)
    cfg = load(args.params).model  # the params themselves must be valid: one line naming the key if not
    source = f"`{args.params}`"
    if args.preset is not None:  # the merge python -m pipeline.preset applies (and models.summary mirrors)
        cfg = preset_config(args.preset, args.params).model
        source = f"`{args.params}` + `{args.preset}`"
    command = "python -m pipeline.summary" + (f" --preset {args.preset}" if args.preset else "")
    if args.markdown is not None:
        command += f" --markdown {args.markdown}"
    print(report(cfg, source, args.markdown, command), end="")


if __name__ == "__main__":
    sys.exit(run_stage(main))
