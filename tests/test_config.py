"""params.yaml -> typed config: the shipped file loads; every user mistake is one clear line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import config
from pipeline.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_shipped_params_load_into_typed_sections():
    cfg = config.load(REPO / "params.yaml")
    assert cfg.data.source == "synthetic"
    assert cfg.windows.in_len == 13 and cfg.windows.out_len == 12 and cfg.windows.stride == 12
    assert cfg.windows.long_len == 25
    assert isinstance(cfg.train.phase1.lr, float)
    assert cfg.data.split.train_end.year == 2019


def test_every_params_section_is_a_field_of_the_config():
    import yaml

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    assert set(raw) == set(config.Config.model_fields)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"windows": {"stride": -1}}, "windows.stride"),
        ({"windows": {"in_len": 0}}, "windows.in_len"),
        ({"data": {"source": "ftp"}}, "data.source"),
        ({"model": {"embed_dimm": 32}}, "model.embed_dimm: unknown key"),
        ({"model": {"embed_dim": "wide"}}, "model.embed_dim"),
        ({"windows": {"in_len": 30, "out_len": 30}}, "exceeds the 49 frames"),
        ({"data": {"split": {"train_end": "2020-01-01 00:00:00"}}}, "data.split.val_end"),
        ({"data": {"source": "local"}}, "data.local.path"),
        ({"windows": {"downsample": 3}}, "windows.downsample"),
        ({"train": {"precision": "fp8"}}, "train.precision"),
        ({"surprise": {}}, "surprise: unknown key; allowed keys here: data, windows"),
    ],
)
def test_bad_value_names_the_key(write_params, overrides, expected):
    path = write_params(overrides)
    with pytest.raises(ConfigError) as err:
        config.load(path)
    message = str(err.value)
    assert expected in message
    assert "\n" not in message


def test_unknown_key_lists_the_allowed_ones():
    with pytest.raises(ConfigError, match="allowed keys here: .*in_len.*stride"):
        config.from_dict({"windows": {"strid": 3}})


def test_frame_size_must_fit_the_model():
    with pytest.raises(ConfigError, match="model.patch_size"):
        config.from_dict({"data": {"synthetic": {"size": 80}}})


def test_scientific_notation_in_yaml_reads_as_float(write_params):
    path = write_params()
    path.write_text(path.read_text().replace("lr: 0.001", "lr: 1e-3"))
    assert config.load(path).train.phase1.lr == pytest.approx(1e-3)


def test_missing_params_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="params file not found"):
        config.load(tmp_path / "nope.yaml")


def test_invalid_yaml_names_the_line(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("data:\n  source: [unclosed\n")
    with pytest.raises(ConfigError, match=r"params.yaml: line \d+ is not valid YAML"):
        config.load(path)


def test_stage_cli_prints_one_line_and_exits_nonzero(write_params):
    path = write_params({"windows": {"stride": 0}})
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.fetch", "--params", str(path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "windows.stride" in lines[0] and "Traceback" not in proc.stderr
