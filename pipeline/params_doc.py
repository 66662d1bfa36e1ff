"""docs/PARAMS.md, the parameter reference, generated from the params.yaml schema.

    python -m pipeline.params_doc [--out docs/PARAMS.md]      # write it
    python -m pipeline.params_doc --check                     # exit 1 when the file is stale

Every key of :class:`pipeline.config.Config` (and :class:`models.config.ModelConfig`), read from the
pydantic models: its type, its bounds, its schema default and what it does. The description is the
field's ``description`` when it has one, otherwise the comment written beside (or just above) the
field in the schema's source, so the schema stays the one place a key is explained.
``tests/test_params_doc.py`` fails when the committed file differs from a fresh one.
"""

from __future__ import annotations

import argparse
import datetime as dt
import inspect
import io
import json
import sys
import tokenize
import types
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from pipeline.config import Config, SearchParam

DEFAULT_OUT = Path("docs/PARAMS.md")
HEADER = """# Parameter reference

Every key of `params.yaml`, generated from the schema (`pipeline/config.py`, `models/config.py`) by
`python -m pipeline.params_doc`; do not edit by hand (`tests/test_params_doc.py` fails when it is stale).
The default is the schema's: `params.yaml` sets some keys to other values (the run's values are in
`dvc params diff` and on every MLflow run). A wrong type, an unknown key or an impossible value stops
a stage with one line naming the key. Override any key in an experiment with
`dvc exp run -S key=value`.
"""


# What the schema's source does not say beside these fields (class name, field). Better moved into the schema
# as Field(description=...), which this generator reads first.
NOTES: dict[tuple[str, str], str] = {
    ("DataConfig", "source"): "where the SEVIR events come from: the embedded sample, the public bucket, a local copy",
    ("DataConfig", "seed"): "seed of the synthetic sample",
    ("SyntheticSource", "n_events"): "events generated",
    ("SyntheticSource", "events_per_file"): "events per SEVIR_VIL_*.h5 file",
    ("S3Source", "bucket"): "bucket name (the public SEVIR bucket is sevir)",
    ("S3Source", "region"): "bucket region",
    ("S3Source", "catalog_key"): "object key of the catalog",
    ("S3Source", "years"): "catalog years to keep",
    ("S3Source", "retries"): "retries of a failed request, with exponential backoff",
    ("S3Source", "backoff_s"): "first backoff, doubled per retry",
    ("S3Source", "part_size_mb"): "size of a ranged part when one file is fetched in parallel parts",
    ("LocalSource", "path"): "the folder holding CATALOG.csv (read in place, never copied)",
    ("WindowsConfig", "in_len"): "input frames per window (kept frames)",
    ("WindowsConfig", "out_len"): "target frames per window, the forecast length",
    ("WindowsConfig", "stride"): "kept frames between the starts of two windows of one event",
    ("WindowsConfig", "root"): "chunk output: train.h5, val.h5, test.h5",
    ("ModelConfig", "name"): "the network: ConvLSTM, SwinLSTM-D, or DATSwinLSTM-D-Memory (docs/models.md)",
    ("ModelConfig", "in_channels"): "channels per frame (VIL: 1)",
    ("ModelConfig", "mlp_ratio"): "hidden width of each block's MLP, as a multiple of its channels",
    ("TrainConfig", "seed"): "seed of the weights' init, the shuffle and augmentation",
    ("OversampleConfig", "enabled"): "draw heavy-rain training windows more often",
    ("AugmentConfig", "mask_size"): "side of a masked patch, pixels",
    ("PhaseConfig", "epochs"): "epochs of this phase",
    ("EvaluateConfig", "ssim"): "score SSIM (slower on CPU)",
    ("EvaluateConfig", "baselines"): "classical forecasters scored beside the model",
    ("EvaluateConfig", "batch_size"): "windows per evaluation batch",
    ("SearchConfig", "direction"): "whether search.metric is maximised or minimised",
    ("SearchConfig", "pruner"): "stops trials whose per-epoch score falls behind (none: every trial runs out)",
    ("SearchConfig", "gc_after_trial"): "free memory after each trial",
    ("SearchParam", "type"): "float, logfloat (sampled on a log scale), int, or categorical",
    ("SearchParam", "high"): "upper end of the range, inclusive",
    ("TrackingConfig", "experiment"): "MLflow experiment the runs go to",
    ("TrackingConfig", "log_system_metrics"): "MLflow system metrics (CPU, memory, GPU) on every stage run",
}


# ----------------------------------------------------------------------------- source comments
def _comments(cls: type) -> dict[str, str]:
    """``{field: comment}`` from the class source: the comment at the end of the field's line, else the
    full-line comments above it, which also hold for the fields right after it (up to a blank line)."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    out: dict[str, str] = {}
    block: list[str] = []  # the comment lines being read
    group = ""  # the last comment block, for the fields under it
    tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    for i, tok in enumerate(tokens):
        if tok.type == tokenize.COMMENT and tok.line.strip().startswith("#"):
            block.append(tok.string.lstrip("#").strip())
            continue
        if tok.type == tokenize.NL and not tok.line.strip():
            block, group = [], ""  # a blank line ends a group
            continue
        if tok.type in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT):
            continue
        start_of_line = tok.line[: tok.start[1]].strip() == ""
        if not start_of_line:
            continue
        if block:
            group, block = " ".join(block), []
        nxt = tokens[i + 1] if i + 1 < len(tokens) else None
        if tok.type == tokenize.NAME and nxt is not None and nxt.string == ":":
            text = _trailing_comment(tokens, i) or group
            if text:
                out[tok.string] = text
        elif tok.type == tokenize.NAME and tok.string in ("def", "class", "@"):
            group = ""
    return out


def _trailing_comment(tokens: list[tokenize.TokenInfo], i: int) -> str:
    """The comment that ends the logical line starting at token ``i`` (a field over several lines too)."""
    depth = 0
    for tok in tokens[i:]:
        if tok.type == tokenize.OP and tok.string in "([{":
            depth += 1
        elif tok.type == tokenize.OP and tok.string in ")]}":
            depth -= 1
        elif tok.type == tokenize.COMMENT:
            text = tok.string.lstrip("#").strip()
            if text.startswith(("fmt:", "type:", "noqa")):
                continue
            return text
        elif tok.type == tokenize.NEWLINE and depth == 0:
            return ""
    return ""


# ----------------------------------------------------------------------------- types and defaults
def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _type_text(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        base, *meta = args
        return _type_text(base) + _bounds(meta)
    if origin is Literal:
        return " | ".join(f"`{json.dumps(a) if not isinstance(a, str) else a}`" for a in args)
    if origin in (typing.Union, types.UnionType):
        parts = [_type_text(a) for a in args if a is not type(None)]
        return " or ".join(parts) + (" or null" if type(None) in args else "")
    if origin is list:
        return f"list of {_type_text(args[0])}" if args else "list"
    if annotation is type(None):
        return "null"
    if isinstance(annotation, type):
        return {"str": "string", "int": "int", "float": "float", "bool": "bool", "Path": "path",
                "date": "date", "datetime": "datetime"}.get(annotation.__name__, annotation.__name__)  # fmt: skip
    return str(annotation).replace("typing.", "")


def _bounds(meta: list[Any]) -> str:
    marks = []
    for item in meta:
        items = getattr(item, "metadata", None) or [item]
        for m in items:
            for attr, sign in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"), ("min_length", "len >=")):
                value = getattr(m, attr, None)
                if value is not None:
                    marks.append(f"{sign} {value}")
    return f" ({', '.join(marks)})" if marks else ""


def _field_type(field: FieldInfo) -> str:
    text = _type_text(field.annotation)
    return text + _bounds(list(field.metadata))


def _default(field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return "(section)"
    if isinstance(value, Path):
        return f"`{value.as_posix()}`"
    if isinstance(value, dt.datetime | dt.date):
        return f"`{value.isoformat()}`"
    if value is None:
        return "`null`"
    return f"`{json.dumps(value)}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


# ----------------------------------------------------------------------------- the document
def _section(model: type[BaseModel], key: str, out: list[str]) -> None:
    doc = inspect.getdoc(model) if model.__doc__ and model.__doc__ is not BaseModel.__doc__ else ""
    comments = _comments(model)
    for klass in model.__mro__[1:]:  # comments of fields a base class declares
        if _is_model(klass) and klass is not BaseModel:
            comments = {**_comments(klass), **comments}
    leaves, nested = [], []
    for name, field in model.model_fields.items():
        if _is_model(field.annotation):
            nested.append((name, field.annotation))
        else:
            leaves.append((name, field))
    out.append(f"{'##' if key.count('.') == 0 else '###'} `{key}`\n")
    if doc:
        out.append(" ".join(line.strip() for line in doc.split("\n\n")[0].splitlines()) + "\n")
    if leaves:
        out.append("| key | type | default | what it does |")
        out.append("|---|---|---|---|")
        for name, field in leaves:
            what = field.description or NOTES.get((model.__name__, name)) or comments.get(name, "")
            if key == "search" and name == "space":
                what = (what + " " if what else "") + "A list of entries, see `search.space[]` below."
            out.append(f"| `{key}.{name}` | {_cell(_field_type(field))} | {_cell(_default(field))} | {_cell(what)} |")
        out.append("")
    for name, sub in nested:
        _section(sub, f"{key}.{name}", out)
    if key == "search":
        _section(SearchParam, "search.space[]", out)


def render() -> str:
    """The whole of docs/PARAMS.md."""
    out = [HEADER]
    out.append("Sections: " + ", ".join(f"[`{name}`](#{name})" for name in Config.model_fields) + ".\n")
    for name, field in Config.model_fields.items():
        _section(field.annotation, name, out)
    return "\n".join(out).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"where to write it (default {DEFAULT_OUT})")
    parser.add_argument("--check", action="store_true", help="exit 1 when --out differs from a fresh render")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not args.out.is_file() or args.out.read_text() != text:
            print(f"error: {args.out} is stale; run python -m pipeline.params_doc", file=sys.stderr)
            return 1
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
