"""Stage fetch: the synthetic and local sources, through the stage entrypoint."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline import fetch, sevir
from pipeline.cli import run_stage
from pipeline.config import SyntheticSource

SMALL = {"n_events": 12, "size": 128, "events_per_file": 6}


@pytest.fixture(scope="module")
def sevir_dir(tmp_path_factory) -> Path:
    """A SEVIR directory somewhere else on disk, as a cluster's shared copy would be."""
    from pipeline.sevir.synthetic import generate

    root = tmp_path_factory.mktemp("shared") / "sevir"
    generate(root, SyntheticSource(**SMALL), seed=3, progress=False)
    return root


def _params(write_params, tmp_path: Path, data: dict) -> Path:
    return write_params({"data": {"root": str(tmp_path / "raw"), **data}, "windows": {"root": str(tmp_path / "windows")}})


def test_synthetic_source_writes_a_sevir_root(write_params, tmp_path):
    params = _params(write_params, tmp_path, {"source": "synthetic", "synthetic": SMALL})
    assert run_stage(fetch.main, ["--params", str(params)]) == 0
    catalog = sevir.read_catalog(tmp_path / "raw")
    assert list(catalog.columns) == sevir.CATALOG_COLUMNS
    for name in sevir.vil_rows(catalog)["file_name"].unique():
        with sevir.VilFile(sevir.safe_join(tmp_path / "raw", name)) as f:
            assert f.frame_shape == (128, 128) and f.n_frames == 49


def test_local_source_reads_in_place_without_copying(write_params, tmp_path, sevir_dir):
    params = _params(write_params, tmp_path, {"source": "local", "local": {"path": str(sevir_dir)}})
    assert run_stage(fetch.main, ["--params", str(params)]) == 0
    raw = tmp_path / "raw"
    assert not list(raw.rglob("*.h5"))
    assert sevir.data_root_of(raw) == sevir_dir.resolve()
    assert (raw / "CATALOG.csv").read_bytes() == (sevir_dir / "CATALOG.csv").read_bytes()


def test_local_source_feeds_chunk(write_params, tmp_path, sevir_dir):
    from pipeline import chunk
    from pipeline.sevir.dataset import WindowDataset

    params = _params(write_params, tmp_path, {"source": "local", "local": {"path": str(sevir_dir)}})
    assert run_stage(fetch.main, ["--params", str(params)]) == 0
    assert run_stage(chunk.main, ["--params", str(params), "--stats", str(tmp_path / "stats.json")]) == 0
    assert len(WindowDataset(tmp_path / "windows" / "train.h5")) > 0


def test_local_source_that_is_not_a_directory_is_one_line(write_params, tmp_path, capsys):
    params = _params(write_params, tmp_path, {"source": "local", "local": {"path": str(tmp_path / "nowhere")}})
    assert run_stage(fetch.main, ["--params", str(params)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "data.local.path" in errors[0] and "Traceback" not in errors[0]
    assert not (tmp_path / "raw").exists()


def test_local_source_without_catalog_is_one_line(write_params, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    params = _params(write_params, tmp_path, {"source": "local", "local": {"path": str(empty)}})
    assert run_stage(fetch.main, ["--params", str(params)]) == 2
    assert "CATALOG.csv: catalog not found" in capsys.readouterr().err
    assert not (tmp_path / "raw").exists()


def test_switching_back_to_synthetic_drops_the_local_pointer(write_params, tmp_path, sevir_dir):
    local = _params(write_params, tmp_path, {"source": "local", "local": {"path": str(sevir_dir)}})
    assert run_stage(fetch.main, ["--params", str(local)]) == 0
    synthetic = _params(write_params, tmp_path, {"source": "synthetic", "synthetic": SMALL})
    assert run_stage(fetch.main, ["--params", str(synthetic)]) == 0
    assert sevir.data_root_of(tmp_path / "raw") == tmp_path / "raw"
