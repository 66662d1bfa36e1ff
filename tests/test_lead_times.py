"""Lead times in minutes come from the windows file's frame interval (10 min at windows.frame_step 2):
the per-lead CSVs, the plots, the gallery labels and the MLflow steps."""

from __future__ import annotations

import logging
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml

from pipeline.errors import DataError
from pipeline.scoring import evaluation, reports
from tests.test_evaluate import OUT, _run, _stage_files


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


def set_attrs(path: Path, **attrs) -> None:
    with h5py.File(path, "r+") as f:
        f.attrs.update(attrs)


@pytest.fixture
def drawn(monkeypatch) -> dict[str, dict]:
    """What every saved figure shows: its axes' titles and the x values of its lines, by file name."""
    seen: dict[str, dict] = {}
    save = reports._save

    def spy(fig, path):
        axes = fig.get_axes()
        seen[Path(path).name] = {
            "titles": [ax.get_title() for ax in axes if ax.get_title()],
            "x": [list(line.get_xdata()) for ax in axes for line in ax.get_lines()],
        }
        return save(fig, path)

    monkeypatch.setattr(reports, "_save", spy)
    return seen


# ------------------------------------------------------------------ the interval
def test_the_frame_interval_is_the_files_frame_minutes(tmp_path):
    root = tmp_path / "r"
    _stage_files(root)
    path = root / "windows" / "test.h5"
    set_attrs(path, frame_step=2, frame_minutes=10)
    assert evaluation.frame_minutes(path) == 10


def test_chunk_at_frame_step_2_writes_10_minute_frames(tmp_path):
    from pipeline.config import WindowsConfig
    from pipeline.sevir import windows
    from tests.test_chunk import SPLIT, make_sample

    sample = make_sample(tmp_path / "raw")
    cfg = WindowsConfig(root=tmp_path / "windows", frame_step=2, in_len=7, out_len=6, stride=6)
    windows.write_windows(sample.raw, cfg, SPLIT, stats_path=tmp_path / "stats.json", progress=False)
    assert evaluation.frame_minutes(tmp_path / "windows" / "test.h5") == 10


def test_a_file_without_frame_minutes_falls_back_to_frame_step_times_5_and_says_so(tmp_path, caplog):
    root = tmp_path / "r"
    _stage_files(root)
    path = root / "windows" / "test.h5"
    with caplog.at_level(logging.INFO, logger="pipeline.scoring.evaluation"):
        assert evaluation.frame_minutes(path) == 5  # neither attribute: 5-minute frames
        set_attrs(path, frame_step=2)
        assert evaluation.frame_minutes(path) == 10
    assert "no frame_minutes attribute" in caplog.text and "frame_step 2 x 5 min = 10 min" in caplog.text


@pytest.mark.parametrize("value", [0, -5, 2.5, "ten"])
def test_a_bad_frame_minutes_is_one_line_naming_the_attribute(tmp_path, value):
    root = tmp_path / "r"
    _stage_files(root)
    path = root / "windows" / "test.h5"
    set_attrs(path, frame_minutes=value)
    with pytest.raises(DataError, match=r"test\.h5: attribute frame_minutes = .* rerun the chunk stage") as err:
        evaluation.frame_minutes(path)
    assert "\n" not in str(err.value)


def test_per_lead_tables_count_leads_in_frame_minutes():
    scores = {"model": {"per_lead": {"csi_m": [0.5, 0.4, 0.3], "mse": [0.1, 0.2, 0.3], "csi": {"16": [0.5, 0.4, 0.3]}}}}
    assert [r["lead_min"] for r in reports.per_lead_tables(scores, frame_minutes=10)["csi_16"]] == [10, 20, 30]
    assert [r["lead_min"] for r in reports.per_lead_tables(scores)["csi_m"]] == [5, 10, 15]


# ---------------------------------------------------------------------- the stage
def test_windows_at_frame_step_2_give_10_minute_leads_everywhere(tmp_path, drawn):
    from mlflow.tracking import MlflowClient

    params = _stage_files(tmp_path)
    set_attrs(tmp_path / "windows" / "test.h5", frame_step=2, frame_minutes=10)
    raw = yaml.safe_load(params.read_text())
    raw["windows"]["frame_step"] = 2  # the params the file was made with (another frame step is refused)
    params.write_text(yaml.safe_dump(raw, sort_keys=False))
    assert _run(params) == 0
    leads = [10 * (j + 1) for j in range(OUT)]

    per_lead = tmp_path / "reports" / "per_lead"
    for csv in ("csi_m.csv", "mse.csv", "csi_74.csv"):
        rows = (per_lead / csv).read_text().splitlines()
        assert [int(r.split(",")[0]) for r in rows[1:]] == leads, csv

    for png in ("lead_csi_m.png", "lead_mse.png", "lead_csi.png"):
        assert drawn[png]["x"] and all(x == leads for x in drawn[png]["x"]), png
    gallery = drawn["gallery.png"]["titles"]
    assert "+10 min" in gallery and "+30 min" in gallery and "-30 min" in gallery  # example_leads 1 and 3; 4 inputs
    assert "+5 min" not in gallery and "+15 min" not in gallery

    client = MlflowClient()
    exp = client.get_experiment_by_name("sevir-nowcasting")
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`pipeline.stage` = 'evaluate'")
    run = next(r for r in runs if r.data.params.get("evaluate.reports_dir") == str(tmp_path / "reports"))
    assert run.data.params["evaluate.frame_minutes"] == "10"
    for metric in ("model.lead.csi_m", "persistence.lead.mse", "optical_flow.lead.csi_74"):
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, metric)) == leads, metric
    assert np.isfinite([m.value for m in client.get_metric_history(run.info.run_id, "model.lead.mse")]).all()
