"""benchmarks/bench_motion_parts.py: a motion checkpoint scored with its flow or its change switched off."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import yaml

import models
from models.config import ModelConfig
from pipeline.preset import merge
from pipeline.scoring import evaluation
from pipeline.scoring.forecasters import ModelForecaster
from tests.helpers.project import REPO
from tests.test_evaluate import IN, OUT, SIZE, moving_storms, write_windows

MOTION_MODEL = {
    "name": "convlstm",
    "patch_size": 4,
    "residual": True,
    "motion": True,
    "prior": {"kind": "block_matching", "pool": 2, "radius": 2, "lag": 1, "pairs": 2, "smooth": 2, "patch": 3},
    "convlstm": {"hidden": [4], "kernel_size": 3},
}


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


def _bench():
    spec = importlib.util.spec_from_file_location("bench_motion_parts", REPO / "benchmarks" / "bench_motion_parts.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _model(overrides: dict | None = None):
    cfg = ModelConfig.model_validate({**MOTION_MODEL, **(overrides or {})})
    torch.manual_seed(0)
    model = models.build(cfg)
    if cfg.motion:  # a trained-looking head: a flow and a change that both move the forecast
        with torch.no_grad():
            model.flow_head.proj.weight.normal_(0, 0.5)
            model.flow_head.proj.bias.copy_(torch.tensor([0.4, -0.3, 2.0]))
    return cfg, model


def _files(root: Path, overrides: dict | None = None) -> tuple[Path, Path]:
    write_windows(root / "windows" / "test.h5", moving_storms(4, IN + OUT, seed=2))
    cfg, model = _model(overrides)
    ckpt = root / "best.pt"
    torch.save({"format": 1, "model": model.state_dict(), "model_config": cfg.model_dump(mode="json"),
                "data": {"in_len": IN, "out_len": OUT, "height": SIZE, "width": SIZE}, "config_hash": "test",
                "phase": 2, "epoch": 1, "step": 1, "best_key": "val.csi_m", "best_score": 0.1, "optimizer": {}},
               ckpt)  # fmt: skip
    params = merge(yaml.safe_load((REPO / "params.yaml").read_text()), {
        "windows": {"root": str(root / "windows"), "in_len": IN, "out_len": OUT},
        "evaluate": {"batch_size": 4, "example_leads": [1, 3]},
    })  # fmt: skip
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return ckpt, root / "params.yaml"


def _rows(out: str) -> dict[str, float]:
    """variant -> CSI-M from the printed table."""
    rows = {}
    for name in _bench().VARIANTS:
        line = next(line for line in out.splitlines() if line.startswith(name))
        rows[name] = float(line[len(name) :].split()[0])
    return rows


def _csi_m(model, params: Path) -> float:
    from pipeline import config as config_mod

    cfg = config_mod.load(params)
    dataset = evaluation.open_windows(params.parent / "windows" / "test.h5")
    return evaluation.evaluate(dataset, {"model": ModelForecaster(model)}, cfg.evaluate).scores["model"]["csi_m"]


def test_each_variant_scores_the_model_with_that_part_of_its_head_zeroed(tmp_path, capsys):
    ckpt, params = _files(tmp_path)
    assert _bench().main([str(ckpt), "--params", str(params), "--threads", "1"]) == 0
    rows = _rows(capsys.readouterr().out)

    # the same scores from models whose head rows are zeroed by hand
    expected = {}
    for name, keep in {"as trained": [0, 1, 2], "flow only (change off)": [0, 1],
                       "change only (learned flow off)": [2], "prior alone (both off)": []}.items():  # fmt: skip
        _, model = _model()
        with torch.no_grad():
            for row in {0, 1, 2} - set(keep):
                model.flow_head.proj.weight[row].zero_()
                model.flow_head.proj.bias[row].zero_()
        expected[name] = _csi_m(model, params)
    assert rows == pytest.approx(expected, abs=1e-4)
    assert len(set(round(v, 4) for v in expected.values())) > 1  # the parts do move the forecast


def test_a_checkpoint_without_motion_output_is_one_clear_line(tmp_path, capsys):
    ckpt, params = _files(tmp_path, {"motion": False, "prior": {"kind": "none"}})
    assert _bench().main([str(ckpt), "--params", str(params), "--threads", "1"]) == 1
    out = capsys.readouterr().out
    assert "model.motion is off" in out and str(ckpt) in out
