"""pipeline.preset: presets/*.yaml -> validated `-S key=value` arguments for `dvc exp run`."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline import config as config_mod
from pipeline import preset
from pipeline.cli import run_stage

REPO = Path(__file__).resolve().parents[1]
PRESETS = sorted((REPO / "presets").glob("*.yaml"))
DATA_PRESETS = ["sevir_lr.yaml", "earthformer.yaml", "reference_12_24.yaml"]


def apply_s_args(params: dict, args: list[str]) -> dict:
    """What `dvc exp run -S k=v ...` does to params.yaml: each value parsed as YAML, set at its dotted key."""
    assert args[::2] == ["-S"] * (len(args) // 2)
    for arg in args[1::2]:
        key, _, text = arg.partition("=")
        *parents, leaf = key.split(".")
        node = params
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(text)
    return params


def test_the_data_presets_are_there():
    assert {p.name for p in PRESETS} >= set(DATA_PRESETS)


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.name)
def test_each_preset_gives_s_arguments_that_reproduce_it(path):
    args, merged = preset.overrides(path, REPO / "params.yaml")
    assert all(" " not in arg for arg in args)  # safe for $(...) word splitting
    applied = apply_s_args(yaml.safe_load((REPO / "params.yaml").read_text()), args)
    assert config_mod.from_dict(applied) == config_mod.from_dict(merged)


def test_sevir_lr_is_10_minute_128px_7_to_6():
    args, merged = preset.overrides(REPO / "presets/sevir_lr.yaml", REPO / "params.yaml")
    cfg = config_mod.from_dict(merged)
    assert (cfg.windows.in_len, cfg.windows.out_len, cfg.windows.frame_step, cfg.windows.stride) == (7, 6, 2, 6)
    assert cfg.frame_size() == 128 and cfg.windows.event_frames == 25


def test_the_command_prints_one_line_of_s_arguments(capsys):
    assert run_stage(preset.main, [str(REPO / "presets/earthformer.yaml"), "--params", str(REPO / "params.yaml")]) == 0
    [line] = capsys.readouterr().out.splitlines()
    assert "-S windows.in_len=13" in line and "-S data.split.train_end=2019-01-01T00:00:00" in line


def test_a_bad_preset_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("windows:\n  in_len: 20\n  frame_step: 2\n")
    assert run_stage(preset.main, [str(bad), "--params", str(REPO / "params.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "exceeds the 25 frames a SEVIR event has at windows.frame_step = 2" in err
    bad.write_text("windows:\n  surprise: 1\n")
    assert run_stage(preset.main, [str(bad), "--params", str(REPO / "params.yaml")]) == 2
    assert "windows.surprise: unknown key" in capsys.readouterr().err
