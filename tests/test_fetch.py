"""Stage fetch: the synthetic and local sources, through the stage entrypoint."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pandas as pd
import pytest

from pipeline import fetch, sevir
from pipeline.cli import run_stage
from pipeline.config import SyntheticSource

REPO = Path(__file__).resolve().parents[1]
SMALL = {"n_events": 12, "size": 128, "events_per_file": 6}


@pytest.fixture(scope="module")
def sevir_dir(tmp_path_factory) -> Path:
    """A SEVIR directory somewhere else on disk, as a cluster's shared copy would be."""
    from pipeline.sevir.synthetic import generate

    root = tmp_path_factory.mktemp("shared") / "sevir"
    generate(root, SyntheticSource(**SMALL), seed=3, progress=False)
    return root


def _params(write_params, tmp_path: Path, data: dict) -> Path:
    return write_params(
        {"data": {"root": str(tmp_path / "raw"), **data}, "windows": {"root": str(tmp_path / "windows")}}
    )


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
    assert sevir.data_root_of(raw) == sevir_dir
    source = pd.read_csv(sevir_dir / "CATALOG.csv", dtype=str, keep_default_na=False)
    written = pd.read_csv(raw / "CATALOG.csv", dtype=str, keep_default_na=False)
    expected = source.iloc[sevir.vil_rows(source.assign(row=range(len(source))))["row"].sort_values()]
    pd.testing.assert_frame_equal(written, expected.reset_index(drop=True))  # the selected VIL rows, values as given


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
    assert "CATALOG.csv: catalog not found; point data.local.path" in capsys.readouterr().err
    assert not (tmp_path / "raw").exists()


def test_switching_back_to_synthetic_drops_the_local_pointer(write_params, tmp_path, sevir_dir):
    local = _params(write_params, tmp_path, {"source": "local", "local": {"path": str(sevir_dir)}})
    assert run_stage(fetch.main, ["--params", str(local)]) == 0
    synthetic = _params(write_params, tmp_path, {"source": "synthetic", "synthetic": SMALL})
    assert run_stage(fetch.main, ["--params", str(synthetic)]) == 0
    assert sevir.data_root_of(tmp_path / "raw") == tmp_path / "raw"


# ------------------------------------------------------------- a copy made with `aws s3 sync`
SIDE = 16
SYNC_FILES = {  # catalog file_name (relative to data/) -> [(id, time_utc, event_type)] in file order
    "vil/2018/SEVIR_VIL_STORMEVENTS_2018_0101_0630.h5": [("S1", "2018-05-01 12:00:00", "Hail"),
                                                         ("S2", "2018-06-10 18:30:00", "Tornado")],
    "vil/2019/SEVIR_VIL_STORMEVENTS_2019_0101_0630.h5": [("S3", "2019-03-01 15:00:00", "Hail"),
                                                         ("S4", "2019-05-02 21:05:00", "Flash Flood")],
    "vil/2019/SEVIR_VIL_RANDOMEVENTS_2019_0701_1231.h5": [("R1", "2019-07-01 06:00:00", ""),
                                                          ("R2", "2019-09-01 07:00:00", "")],
}  # fmt: skip


def make_sync_tree(top: Path, vil_elsewhere: Path | None = None) -> Path:
    """``top`` as `aws s3 sync --no-sign-request s3://sevir top` leaves it: CATALOG.csv at the top
    (VIL and ir069 rows, file_name relative to data/), files under top/data/vil/. With
    ``vil_elsewhere`` the vil/ folder lives there and top/data/vil is a symlink to it."""
    import h5py
    import numpy as np

    rng = np.random.default_rng(0)
    vil_root = (vil_elsewhere or top / "data") / "vil"
    rows = []
    for name, events in SYNC_FILES.items():
        path = vil_root / name.removeprefix("vil/")
        path.parent.mkdir(parents=True, exist_ok=True)
        with h5py.File(path, "w") as f:
            f.create_dataset("id", data=np.array([e[0].encode() for e in events]))
            f.create_dataset("vil", data=rng.integers(0, 256, (len(events), SIDE, SIDE, 49), dtype=np.uint8))
        for index, (event_id, time_utc, event_type) in enumerate(events):
            for img_type in ("vil", "ir069"):
                row = dict.fromkeys(sevir.CATALOG_COLUMNS, 0)
                row.update(id=event_id, file_name=name.replace("vil", img_type), file_index=index, img_type=img_type,
                           time_utc=time_utc, event_type=event_type, proj=sevir.PROJ, minute_offsets="-120:120")  # fmt: skip
                rows.append(row)
    if vil_elsewhere is not None:
        (top / "data").mkdir(parents=True, exist_ok=True)
        (top / "data" / "vil").symlink_to(vil_root, target_is_directory=True)
    pd.DataFrame(rows, columns=sevir.CATALOG_COLUMNS).to_csv(top / sevir.CATALOG_NAME, index=False)
    return top


def _stage_errors(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]


@pytest.mark.parametrize("symlinked", [False, True], ids=["sync-layout", "vil-symlinked-in"])
def test_sync_layout_runs_fetch_and_chunk(write_params, tmp_path, capsys, symlinked):
    from pipeline import chunk
    from pipeline.sevir.dataset import WindowDataset

    top = make_sync_tree(tmp_path / "sevir_data", vil_elsewhere=tmp_path / "shared_disk" if symlinked else None)
    params = _params(write_params, tmp_path, {"source": "local", "local": {"path": str(top)}})
    assert run_stage(fetch.main, ["--params", str(params)]) == 0
    assert "bucket layout (aws s3 sync)" in capsys.readouterr().err  # the stage logs to stderr
    assert sevir.data_root_of(tmp_path / "raw") == top / "data"
    assert run_stage(chunk.main, ["--params", str(params), "--stats", str(tmp_path / "stats.json")]) == 0
    counts = {split: len(WindowDataset(tmp_path / "windows" / f"{split}.h5")) for split in ("train", "val", "test")}
    assert counts == {"train": 6, "val": 6, "test": 6}  # 2 events each, 3 windows per 49-frame event


def test_flat_layout_is_detected_and_logged(write_params, tmp_path, capsys):
    top = make_sync_tree(tmp_path / "sevir_data")
    flat = tmp_path / "flat"
    flat.mkdir()
    (top / "data" / "vil").rename(flat / "vil")
    (top / sevir.CATALOG_NAME).rename(flat / sevir.CATALOG_NAME)
    params = _params(write_params, tmp_path, {"source": "local", "local": {"path": str(flat)}})
    assert run_stage(fetch.main, ["--params", str(params)]) == 0
    assert "flat layout" in capsys.readouterr().err
    assert sevir.data_root_of(tmp_path / "raw") == flat


def test_local_selects_years_and_event_types(write_params, tmp_path):
    top = make_sync_tree(tmp_path / "sevir_data")
    local = {"path": str(top), "years": [2019], "event_types": ["hail", "Flash Flood"]}
    params = _params(write_params, tmp_path, {"source": "local", "local": local})
    assert run_stage(fetch.main, ["--params", str(params)]) == 0
    written = pd.read_csv(tmp_path / "raw" / sevir.CATALOG_NAME, dtype=str, keep_default_na=False)
    assert written["id"].tolist() == ["S3", "S4"] and set(written["img_type"]) == {"vil"}


def test_a_missing_file_is_one_line_at_fetch_and_keeps_the_previous_root(write_params, tmp_path, capsys):
    top = make_sync_tree(tmp_path / "sevir_data")
    params = _params(write_params, tmp_path, {"source": "local", "local": {"path": str(top)}})
    assert run_stage(fetch.main, ["--params", str(params)]) == 0
    before = (tmp_path / "raw" / sevir.CATALOG_NAME).read_bytes()
    capsys.readouterr()
    gone = top / "data" / "vil/2019/SEVIR_VIL_RANDOMEVENTS_2019_0701_1231.h5"
    gone.unlink()

    assert run_stage(fetch.main, ["--params", str(params)]) == 2
    [line] = _stage_errors(capsys)
    assert "1 of 3 VIL files the selected catalog rows reference (2 events) are missing" in line
    assert f"first: {gone}" in line and "data.local.data_prefix" in line and "data.local.years" in line
    assert (tmp_path / "raw" / sevir.CATALOG_NAME).read_bytes() == before  # nothing replaced


def test_a_wrong_data_prefix_names_the_missing_files(write_params, tmp_path, capsys):
    top = make_sync_tree(tmp_path / "sevir_data")
    params = _params(write_params, tmp_path, {"source": "local", "local": {"path": str(top), "data_prefix": ""}})
    assert run_stage(fetch.main, ["--params", str(params)]) == 2
    [line] = _stage_errors(capsys)
    assert "3 of 3 VIL files" in line and "(data.local.data_prefix = '')" in line and "try 'data'" in line


def test_a_file_without_the_catalog_event_is_one_line(write_params, tmp_path, capsys):
    import h5py

    top = make_sync_tree(tmp_path / "sevir_data")
    with h5py.File(top / "data" / "vil/2018/SEVIR_VIL_STORMEVENTS_2018_0101_0630.h5", "r+") as f:
        del f["id"]
        f.create_dataset("id", data=[b"S1", b"S9"])
    params = _params(write_params, tmp_path, {"source": "local", "local": {"path": str(top)}})
    assert run_stage(fetch.main, ["--params", str(params)]) == 2
    [line] = _stage_errors(capsys)
    assert "1 of 3 VIL files" in line and "row 1 holds event 'S9' but the catalog says 'S2'" in line


@pytest.mark.parametrize(("bad_name", "message"),
                         [("../outside/vil.h5", "escapes the data root"), ("vil/../../x.h5", "escapes the data root"),
                          ("/etc/passwd", "not a relative path"), ("C:/sevir/vil.h5", "not a relative path")])  # fmt: skip
def test_names_escaping_the_root_are_refused(write_params, tmp_path, capsys, bad_name, message):
    top = make_sync_tree(tmp_path / "sevir_data")
    catalog = pd.read_csv(top / sevir.CATALOG_NAME)
    catalog.loc[catalog["id"] == "S1", "file_name"] = bad_name
    catalog.to_csv(top / sevir.CATALOG_NAME, index=False)
    params = _params(write_params, tmp_path, {"source": "local", "local": {"path": str(top)}})
    assert run_stage(fetch.main, ["--params", str(params)]) == 2
    [line] = _stage_errors(capsys)
    assert f"file_name {bad_name!r}" in line and message in line


def test_safe_join_follows_symlinked_folders_but_not_dotdot(tmp_path):
    from pipeline.errors import DataError

    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "vil").symlink_to(tmp_path / "elsewhere")
    assert sevir.safe_join(tmp_path / "root", "vil/2019/x.h5") == tmp_path / "root" / "vil/2019/x.h5"
    for bad in ("../x.h5", "vil/../../x.h5", "/x.h5", "\\\\server\\x.h5", "d:x.h5", ""):
        with pytest.raises(DataError):
            sevir.safe_join(tmp_path / "root", bad)


# ----------------------------------------------------------------- one fetch per root at a time
def test_a_second_fetch_stops_with_one_line_while_the_first_holds_the_root(write_params, tmp_path, capsys):
    top = make_sync_tree(tmp_path / "sevir_data")
    params = _params(write_params, tmp_path, {"source": "local", "local": {"path": str(top)}, "lock_wait_s": 0})
    with sevir.exclusive_lock(tmp_path / "raw", 0):
        assert run_stage(fetch.main, ["--params", str(params)]) == 2
    [line] = _stage_errors(capsys)
    assert f"{tmp_path / 'raw'}: another fetch (pid {os.getpid()}" in line and "data.lock_wait_s" in line
    assert not (tmp_path / "raw").exists()
    assert run_stage(fetch.main, ["--params", str(params)]) == 0  # the lock went with its holder


def test_a_second_fetch_waits_for_the_first(write_params, tmp_path, capsys):
    top = make_sync_tree(tmp_path / "sevir_data")
    params = _params(write_params, tmp_path, {"source": "local", "local": {"path": str(top)}, "lock_wait_s": 30})
    held, release = threading.Event(), threading.Event()

    def first() -> None:
        with sevir.exclusive_lock(tmp_path / "raw", 0):
            held.set()
            release.wait(30)

    holder = threading.Thread(target=first)
    holder.start()
    held.wait(10)
    threading.Timer(0.5, release.set).start()
    assert run_stage(fetch.main, ["--params", str(params)]) == 0
    holder.join()
    err = capsys.readouterr().err
    assert "waiting up to 30 s" in err and "the other fetch finished" in err


CONCURRENT_FETCH = """
import sys
from pipeline import fetch
from pipeline.cli import run_stage
sys.exit(run_stage(fetch.main, ["--params", sys.argv[1]]))
"""


def test_two_concurrent_fetches_into_one_root(write_params, tmp_path):
    """Two real processes fetch into one root at once: both succeed, one after the other, and the
    root is a complete, checked SEVIR root. The test holds the lock until both are waiting, so
    they surely overlap."""
    import time

    from pipeline.sevir.verify import verify_vil_files

    small = {"n_events": 4, "size": 128, "events_per_file": 2}
    params = write_params({"data": {"root": str(tmp_path / "raw"), "source": "synthetic", "synthetic": small,
                                     "lock_wait_s": 120}, "tracking": {"enabled": False}})  # fmt: skip
    env = os.environ | {"PYTHONPATH": str(REPO)}
    logs = [tmp_path / f"fetch{i}.log" for i in range(2)]
    with sevir.exclusive_lock(tmp_path / "raw", 0):
        procs = [subprocess.Popen([sys.executable, "-c", CONCURRENT_FETCH, str(params)], cwd=tmp_path, env=env,
                                  stderr=log.open("w")) for log in logs]  # fmt: skip
        deadline = time.monotonic() + 120
        while not all("waiting up to" in log.read_text() for log in logs) and time.monotonic() < deadline:
            assert all(proc.poll() is None for proc in procs), [log.read_text() for log in logs]
            time.sleep(0.1)
    codes = [proc.wait(timeout=300) for proc in procs]
    errs = [log.read_text() for log in logs]
    assert codes == [0, 0], errs
    assert all("the other fetch finished" in err for err in errs)
    catalog = sevir.read_catalog(tmp_path / "raw")
    assert verify_vil_files(catalog, tmp_path / "raw", "") == sevir.vil_rows(catalog)["file_name"].nunique() > 0
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]  # no half-written sibling left
