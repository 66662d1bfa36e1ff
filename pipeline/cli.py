"""What every stage entrypoint shares: argument parsing, logging, clean errors."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.outputs import is_write_error, output_error

log = logging.getLogger("pipeline")


def setup_logging(verbose: bool = False, log_file: Path | None = None) -> None:
    """Human-readable logs to the terminal and, optionally, to a file."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file))
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        handlers=handlers,
        force=True,
    )


def stage_parser(description: str) -> argparse.ArgumentParser:
    """An argparse parser with the options every stage takes."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file (default: params.yaml)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def run_stage(main: Callable[[list[str] | None], None], argv: list[str] | None = None) -> int:
    """Run a stage's ``main``; a :class:`PipelineError` (or a write refused for space or permission) becomes
    one line on stderr and exit code 2."""
    try:
        main(argv)
    except PipelineError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a write the stage did not wrap: a full disk or unwritable folder is still one line
        if not (is_write_error(err) and err.filename):
            raise
        print(f"error: {output_error(err, err.filename, 'the setting that names this path')}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    return 0
