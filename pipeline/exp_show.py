"""`dvc exp show`, narrowed to what gets compared, in a terminal of any width (``make exp-show``).

    python -m pipeline.exp_show [--width 120] [--all-params] [--sort model.csi_m] [--json FILE]

Reads ``dvc exp show --json`` (or FILE) and prints one row per commit and experiment: its name, the
params that differ between the rows (the thing you changed comes first), then the headline scores of
``reports/metrics.json`` in this order until the width is used: the model's CSI-M, its ratio to
persistence, persistence's and optical flow's CSI-M, the ratio to optical flow, the model's MSE
(x10^-3) and SSIM. Rows are sorted by the model's CSI-M within each commit. ``dvc exp show`` itself
has every column (``--csv``, ``--md``, ``--only-changed``, ``--keep``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

METRICS_FILE = "reports/metrics.json"
# (header, metric key in metrics.json, scale, format), in the order they are added while they fit
SCORES = [
    ("CSI-M", "model.csi_m", 1.0, ".4f"),
    ("x pers", "model_vs_persistence.csi_m_ratio", 1.0, ".3f"),
    ("pers CSI-M", "persistence.csi_m", 1.0, ".4f"),
    ("flow CSI-M", "optical_flow.csi_m", 1.0, ".4f"),
    ("x flow", "model_vs_optical_flow.csi_m_ratio", 1.0, ".3f"),
    ("MSE e-3", "model.mse", 1e3, ".2f"),
    ("SSIM", "model.ssim", 1.0, ".3f"),
]
MAX_VALUE = 16  # characters of a param value shown (longer lists are cut with ~)


def _flat(prefix: str, node: Any, out: dict[str, Any]) -> dict[str, Any]:
    if isinstance(node, dict):
        for key, value in node.items():
            _flat(f"{prefix}.{key}" if prefix else str(key), value, out)
    else:
        out[prefix] = node
    return out


def _row(entry: dict[str, Any], label: str) -> dict[str, Any]:
    data = entry.get("data") or {}
    params: dict[str, Any] = {}
    for file in (data.get("params") or {}).values():
        _flat("", (file or {}).get("data") or {}, params)
    metrics = _flat("", ((data.get("metrics") or {}).get(METRICS_FILE) or {}).get("data") or {}, {})
    return {"label": label, "params": params, "metrics": metrics}


def rows_from_json(doc: Sequence[dict[str, Any]], sort_key: str = "model.csi_m") -> list[dict[str, Any]]:
    """The rows of ``dvc exp show --json``: each commit, then its experiments (best ``sort_key`` first)."""
    rows = []
    for commit in doc:
        rev = str(commit.get("rev", ""))
        name = commit.get("name") or (rev if rev == "workspace" else rev[:7])
        rows.append(_row(commit, name))
        exps = []
        for exp in commit.get("experiments") or []:
            for rev in exp.get("revs") or []:
                short = str(rev.get("rev", ""))[:7]
                exps.append(_row(rev, f"{short} [{rev.get('name') or exp.get('name') or '?'}]"))
        exps.sort(key=lambda r: -(r["metrics"].get(sort_key) or float("-inf")))
        for i, row in enumerate(exps):
            row["label"] = ("└── " if i == len(exps) - 1 else "├── ") + row["label"]
        rows += exps
    return rows


def changed_params(rows: Sequence[dict[str, Any]]) -> list[str]:
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row["params"] if k not in keys]
    return [k for k in keys if len({json.dumps(r["params"].get(k), sort_keys=True) for r in rows}) > 1]


def _text(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.4g}"
    text = json.dumps(value, separators=(",", ":")) if isinstance(value, list | dict) else str(value)
    return text if len(text) <= MAX_VALUE else text[: MAX_VALUE - 1] + "~"


def _score(value: Any, scale: float, fmt: str) -> str:
    return "-" if not isinstance(value, int | float) else format(value * scale, fmt)


def render(rows: Sequence[dict[str, Any]], width: int = 120, all_params: bool = False) -> str:
    """The table: Experiment, the changed params, then as many headline scores as ``width`` allows (the
    model's CSI-M always). Params that do not fit are named below the table (``--all-params`` shows them)."""
    if not rows:
        return "no experiments (run dvc exp run)\n"
    columns: list[tuple[str, list[str], bool]] = [("Experiment", [r["label"] for r in rows], False)]
    used = lambda cols: sum(max(len(h), *(len(c) for c in cells)) for h, cells, _ in cols) + 2 * (len(cols) - 1)  # noqa: E731
    scores = [(h, [_score(r["metrics"].get(k), s, f) for r in rows], True) for h, k, s, f in SCORES]
    columns.append(scores[0])  # the model's CSI-M, always
    hidden = []
    for key in changed_params(rows):
        col = (key, [_text(r["params"].get(key)) for r in rows], False)
        if all_params or used([*columns, col]) <= width:
            columns.insert(len(columns) - 1, col)
        else:
            hidden.append(key)
    for col in scores[1:]:  # in order of importance, while they fit
        if hidden or used([*columns, col]) > width:
            break
        columns.append(col)
    widths = [max(len(h), *(len(c) for c in cells)) for h, cells, _ in columns]

    def line(cells: Iterable[str]) -> str:
        parts = [c.rjust(w) if num else c.ljust(w) for c, w, (_, _, num) in zip(cells, widths, columns, strict=True)]
        return "  ".join(parts).rstrip()

    out = [line(h for h, _, _ in columns), "  ".join("-" * w for w in widths)]
    out += [line(cells[i] for _, cells, _ in columns) for i in range(len(rows))]
    if hidden:
        out.append(f"(+{len(hidden)} changed params not shown: {', '.join(hidden)}; --all-params, or a wider --width)")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--width", type=int, default=None, help="columns (default: the terminal's, at most 120 if unknown)"
    )
    parser.add_argument("--all-params", action="store_true", help="every changed param, however wide")
    parser.add_argument("--sort", default="model.csi_m", help="metric to sort experiments by (descending)")
    parser.add_argument("--json", type=Path, help="read this `dvc exp show --json` output instead of running dvc")
    args, extra = parser.parse_known_args(argv)
    if args.json:
        doc = json.loads(args.json.read_text())
    else:
        dvc = shutil.which("dvc") or str(Path(sys.executable).parent / "dvc")
        proc = subprocess.run([dvc, "exp", "show", "--json", *extra], capture_output=True, text=True)
        if proc.returncode:
            print(f"error: dvc exp show failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}", file=sys.stderr)
            return 2
        doc = json.loads(proc.stdout)
    width = args.width or int(os.environ.get("COLUMNS", 0)) or shutil.get_terminal_size((120, 24)).columns
    sys.stdout.write(render(rows_from_json(doc, args.sort), width, args.all_params))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
