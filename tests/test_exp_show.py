"""`make exp-show` (pipeline.exp_show): the changed params and the headline scores fit 120 columns."""

from __future__ import annotations

import json

from pipeline import exp_show


def _rev(rev: str, name: str | None, params: dict, csi_m: float) -> dict:
    metrics = {
        "model": {"csi_m": csi_m, "mse": 0.0233, "ssim": 0.36},
        "persistence": {"csi_m": 0.2766},
        "optical_flow": {"csi_m": 0.458},
        "model_vs_persistence": {"csi_m_ratio": csi_m / 0.2766},
        "model_vs_optical_flow": {"csi_m_ratio": csi_m / 0.458},
    }
    base = {
        "model": {"name": "datswinlstm_memory", "embed_dim": 32, "depths_down": [2, 2]},
        "train": {"phase1": {"lr": 0.001}},
        "evaluate": {"thresholds": [16, 74, 133, 160, 181, 219]},
    }
    for key, value in params.items():
        node = base
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    return {
        "rev": rev,
        "name": name,
        "data": {"params": {"params.yaml": {"data": base}}, "metrics": {"reports/metrics.json": {"data": metrics}}},
    }


DOC = [
    {**_rev("workspace", None, {}, 0.2797), "experiments": None},
    {
        **_rev("0123456789abcdef", "main", {}, 0.2797),
        "experiments": [
            {"name": "wide", "revs": [_rev("a1b2c3d4e5f6", "wide", {"model.embed_dim": 64}, 0.31)]},
            {
                "name": "deeper-and-slower",
                "revs": [
                    _rev(
                        "f6e5d4c3b2a1",
                        "deeper-and-slower",
                        {"model.depths_down": [1, 3], "train.phase1.lr": 0.0003},
                        0.25,
                    )
                ],
            },
        ],
    },
]


def test_rows_are_sorted_by_csi_m_with_the_changed_params_first():
    out = exp_show.render(exp_show.rows_from_json(DOC), width=120)
    lines = out.splitlines()
    assert all(len(line) <= 120 for line in lines), out
    header = lines[0].split()
    assert header[:4] == ["Experiment", "model.embed_dim", "model.depths_down", "train.phase1.lr"], header
    assert header[4] == "CSI-M"  # the model's score follows the params, then the baselines while they fit
    assert "evaluate.thresholds" not in out  # unchanged params are left out
    names = [line.split()[0] for line in lines[2:]]
    assert names[:2] == ["workspace", "main"]
    assert "[wide]" in lines[4] and "[deeper-and-slower]" in lines[5]  # best CSI-M first
    assert "0.3100" in lines[4] and "[1,3]" in lines[5]


def test_a_narrow_terminal_keeps_the_model_score_and_names_the_params_left_out():
    out = exp_show.render(exp_show.rows_from_json(DOC), width=70)
    assert all(len(line) <= 70 for line in out.splitlines()[:-1]), out
    assert "CSI-M" in out.splitlines()[0] and "model.embed_dim" in out.splitlines()[0]
    assert "changed params not shown:" in out.splitlines()[-1] and "train.phase1.lr" in out.splitlines()[-1]


def test_cli_reads_a_saved_json(tmp_path, capsys):
    saved = tmp_path / "exp.json"
    saved.write_text(json.dumps(DOC))
    assert exp_show.main(["--json", str(saved), "--width", "120"]) == 0
    assert "model.embed_dim" in capsys.readouterr().out
