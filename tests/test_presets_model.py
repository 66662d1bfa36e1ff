"""Model presets (reference SEVIR, small GPU) through `python -m pipeline.preset`: valid presets, -S overrides that reproduce them, one-line errors."""

from __future__ import annotations

import shlex
import subprocess
import sys

import pytest
import yaml

from pipeline.config import from_dict, load
from pipeline.preset import main as preset_main
from pipeline.preset import merge, overrides

PRESETS = ["reference_sevir.yaml", "small_gpu.yaml"]


def _apply(params: dict, args: list[str]) -> dict:
    """Apply `-S key=value` pairs the way dvc does: the value parsed as YAML (the override grammar's subset)."""
    out = yaml.safe_load(yaml.safe_dump(params))
    for flag, pair in zip(args[::2], args[1::2], strict=True):
        assert flag == "-S"
        key, value = pair.split("=", 1)
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    return out


@pytest.mark.parametrize("name", PRESETS)
def test_preset_overrides_rebuild_the_preset(repo_root, name: str) -> None:
    preset = repo_root / "presets" / name
    params = repo_root / "params.yaml"
    args, _ = overrides(preset, params)
    base = yaml.safe_load(params.read_text())
    expected = from_dict(merge(base, yaml.safe_load(preset.read_text())))
    assert from_dict(_apply(base, args)) == expected
    assert all(" " not in a for a in args)  # survives $(...) word splitting


def test_reference_preset_is_the_published_configuration(repo_root) -> None:
    cfg = from_dict(merge(yaml.safe_load((repo_root / "params.yaml").read_text()),
                          yaml.safe_load((repo_root / "presets" / "reference_sevir.yaml").read_text())))  # fmt: skip
    m = cfg.model
    assert (m.patch_size, m.embed_dim, m.window_size, m.heads) == (4, 128, 4, [4, 8])
    assert (m.depths_down, list(reversed(m.depths_up))) == ([3, 2], [2, 3])  # reference order: [2, 3]
    assert (m.memory.slots, m.memory.dim) == (100, 512)
    assert (m.memory.read, m.memory.fusion, m.memory.encoders, m.skips, m.head) == (
        "attention", "reference", "separate", False, "sigmoid",
    )  # fmt: skip
    assert cfg.data.synthetic.size // cfg.windows.downsample == 384


def test_the_command_prints_one_line_of_overrides(repo_root) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "pipeline.preset", "presets/reference_sevir.yaml"],
        cwd=repo_root, capture_output=True, text=True, check=True,
    )  # fmt: skip
    args = shlex.split(out.stdout)
    assert out.stdout.count("\n") == 1 and args[:2] == ["-S", "data.synthetic.size=384"]
    assert "model.depths_up=[3,2]" in args


def test_an_invalid_preset_is_one_line_and_prints_no_overrides(tmp_path, repo_root, capsys) -> None:
    from pipeline.cli import run_stage

    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  pos: rotary\n  embed_dim: 24\n")
    code = run_stage(preset_main, [str(bad), "--params", str(repo_root / "params.yaml")])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    assert captured.err.count("\n") == 1 and "model.pos" in captured.err


def test_params_yaml_itself_is_valid(repo_root) -> None:
    load(repo_root / "params.yaml")
