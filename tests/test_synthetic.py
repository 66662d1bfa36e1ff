"""Specification of the embedded SEVIR-format sample generator (pipeline.sevir.synthetic)."""

from __future__ import annotations

import re
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest

from pipeline import sevir
from pipeline.config import SplitConfig, SyntheticSource
from pipeline.sevir import _fields, synthetic

SMALL = SyntheticSource(n_events=12, size=64)  # 49 frames, like SEVIR
TINY = SyntheticSource(n_events=12, size=16, frames=2, events_per_file=2)  # layout checks only


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame]:
    root = tmp_path_factory.mktemp("sample") / "raw"
    return root, synthetic.generate(root, SMALL, seed=0, progress=False)


@pytest.fixture(scope="module")
def events(sample: tuple[Path, pd.DataFrame]) -> list[np.ndarray]:
    """The usable events (what the chunk stage keeps) as uint8 (H, W, T) arrays, in time order."""
    root, catalog = sample
    out = []
    for _, row in sevir.vil_rows(catalog).iterrows():
        with sevir.VilFile(root / row.file_name) as f:
            out.append(f.read(row.file_index)[0])
    return out


def read_all_vil(root: Path) -> dict[str, np.ndarray]:
    arrays = {}
    for path in sorted(root.rglob("*.h5")):
        with h5py.File(path, "r") as h5:
            arrays[str(path.relative_to(root))] = h5["vil"][:]
    return arrays


# ------------------------------------------------------------------- catalog
def test_catalog_has_the_21_sevir_columns_in_order(sample):
    root, catalog = sample
    assert list(catalog.columns) == sevir.CATALOG_COLUMNS
    assert list(pd.read_csv(root / "CATALOG.csv").columns) == sevir.CATALOG_COLUMNS


def test_returned_catalog_is_what_was_written(sample):
    root, catalog = sample
    pd.testing.assert_frame_equal(catalog, sevir.read_catalog(root))


def test_vil_rows_describe_frames_of_1_km_pixels(sample):
    _, catalog = sample
    vil = catalog[catalog.img_type == "vil"]
    assert len(vil.drop_duplicates("id")) == SMALL.n_events
    assert (vil.size_x == SMALL.size).all() and (vil.size_y == SMALL.size).all()
    assert (vil.height_m == SMALL.size * 1000).all() and (vil.width_m == SMALL.size * 1000).all()
    assert (vil.proj == sevir.PROJ).all()
    assert (vil.minute_offsets == ":".join(str(m) for m in range(-120, 121, 5))).all()


def test_corners_lie_over_the_contiguous_us(sample):
    _, catalog = sample
    assert catalog.llcrnrlat.between(20, 55).all() and catalog.urcrnrlat.between(20, 55).all()
    assert catalog.llcrnrlon.between(-130, -60).all() and catalog.urcrnrlon.between(-130, -60).all()
    assert (catalog.llcrnrlat < catalog.urcrnrlat).all() and (catalog.llcrnrlon < catalog.urcrnrlon).all()


def test_storm_events_have_numeric_ids_and_an_nws_event_type(sample):
    _, catalog = sample
    storms = catalog[catalog.id.str.startswith("S")]
    assert len(storms.drop_duplicates("id")) == round(SMALL.n_events * SMALL.storm_fraction)
    assert (storms.id == "S" + storms.event_id.astype(int).astype(str)).all()
    assert storms.episode_id.notna().all()
    assert storms.event_type.isin(synthetic.EVENT_TYPES).all()


def test_random_events_have_no_episode_event_id_or_type(sample):
    _, catalog = sample
    randoms = catalog[catalog.id.str.startswith("R")]
    assert len(randoms) > 0
    assert randoms.episode_id.isna().all() and randoms.event_id.isna().all() and randoms.event_type.isna().all()


def test_time_utc_is_sevir_formatted_and_spread_over_the_period(sample):
    _, catalog = sample
    assert catalog.time_utc.str.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d").all()
    times = pd.to_datetime(catalog.drop_duplicates("id").time_utc).sort_values()
    assert times.min() >= pd.Timestamp(SMALL.first_day) and times.max() < pd.Timestamp(SMALL.last_day) + pd.Timedelta(
        days=1
    )
    span = pd.Timestamp(SMALL.last_day) - pd.Timestamp(SMALL.first_day)
    assert times.diff().max() < 2.5 * span / SMALL.n_events  # no long empty stretch


def test_every_split_gets_events(sample):
    _, catalog = sample
    times = sevir.vil_rows(catalog).time_utc
    split = SplitConfig()
    assert (times <= split.train_end).sum() > 0
    assert ((times > split.train_end) & (times <= split.val_end)).sum() > 0
    assert (times > split.val_end).sum() > 0


def test_data_min_and_max_are_the_decoded_extremes_of_each_event(sample):
    root, catalog = sample
    for _, row in catalog[catalog.img_type == "vil"].iterrows():
        with sevir.VilFile(root / row.file_name) as f:
            vil = f.read(row.file_index)
        expected = sevir.vil_to_kgm2(np.array([vil.min(), vil.max()]))
        assert row.data_min == pytest.approx(expected[0], abs=1e-5)
        assert row.data_max == pytest.approx(expected[1], abs=1e-5)


# ------------------------------------------------------------ imperfections
def test_two_events_have_a_duplicate_vil_row(sample):
    _, catalog = sample
    vil = catalog[catalog.img_type == "vil"]
    duplicated = vil[vil.duplicated(keep=False)]
    assert duplicated.id.nunique() == 2 and len(duplicated) == 4


def test_two_events_have_missing_data_and_a_zeroed_block(sample):
    root, catalog = sample
    missing = catalog[(catalog.img_type == "vil") & (catalog.pct_missing != 0)]
    assert missing.id.nunique() == 2
    for _, row in missing.iterrows():
        with sevir.VilFile(root / row.file_name) as f:
            vil = f.read(row.file_index)[0]
        assert (vil == 0).mean() * 100 >= row.pct_missing


def test_other_image_types_are_listed_but_have_no_files(sample):
    root, catalog = sample
    others = catalog[catalog.img_type != "vil"]
    assert 0 < len(others) <= 6 and set(others.img_type) <= {"ir069", "ir107", "vis"}
    assert not any((root / name).exists() for name in others.file_name)


def test_vil_rows_filter_leaves_one_clean_row_per_good_event(sample):
    _, catalog = sample
    rows = sevir.vil_rows(catalog)
    assert rows.id.is_unique and len(rows) == SMALL.n_events - 2
    assert (rows.pct_missing == 0).all() and (rows.img_type == "vil").all()


# ------------------------------------------------------------------ h5 files
def test_h5_files_hold_id_bytes_and_vil_uint8_n_h_w_t(sample):
    root, catalog = sample
    for name in catalog[catalog.img_type == "vil"].file_name.unique():
        with h5py.File(root / name, "r") as h5:
            assert h5["id"].dtype.kind == "S" and h5["id"].ndim == 1
            assert h5["vil"].dtype == np.uint8
            assert h5["vil"].shape == (len(h5["id"]), SMALL.size, SMALL.size, SMALL.frames)


def test_catalog_rows_point_at_their_event_in_the_h5(sample):
    root, catalog = sample
    for _, row in catalog[catalog.img_type == "vil"].iterrows():
        with sevir.VilFile(root / row.file_name) as f:
            assert f.ids[row.file_index] == row.id


def test_events_go_into_the_file_of_their_kind_year_and_half_year(sample):
    _, catalog = sample
    vil = catalog[catalog.img_type == "vil"]
    for _, row in vil.iterrows():
        time = pd.Timestamp(row.time_utc)
        kind = "STORMEVENTS" if row.id.startswith("S") else "RANDOMEVENTS"
        half = "0101_0630" if time.month <= 6 else "0701_1231"
        assert row.file_name == sevir.vil_file_name(time.year, kind, *half.split("_"))


def test_full_half_years_are_split_into_distinctly_named_files(tmp_path):
    catalog = synthetic.generate(tmp_path / "raw", TINY.model_copy(update={"n_events": 30}), seed=0, progress=False)
    vil = catalog[catalog.img_type == "vil"].drop_duplicates()
    pattern = r"vil/(\d{4})/SEVIR_VIL_(STORM|RANDOM)EVENTS_\1_(\d{4})_(\d{4})(_\d+)?\.h5"
    for name, rows in vil.groupby("file_name"):
        match = re.fullmatch(pattern, name)
        assert match is not None, name
        with h5py.File(tmp_path / "raw" / name, "r") as h5:
            assert len(h5["id"]) == len(rows) <= TINY.events_per_file
        dates = pd.to_datetime(rows.time_utc).dt.strftime("%m%d")
        assert (dates >= match.group(3)).all() and (dates <= match.group(4)).all()
    assert vil.file_name.nunique() >= 30 / TINY.events_per_file


# ------------------------------------------------------------- determinism
def test_same_seed_gives_the_same_catalog_and_identical_vil(sample, tmp_path):
    root, catalog = sample
    again = synthetic.generate(tmp_path / "again", SMALL, seed=0, progress=False)
    pd.testing.assert_frame_equal(catalog, again)
    first, second = read_all_vil(root), read_all_vil(tmp_path / "again")
    assert first.keys() == second.keys()
    assert all(np.array_equal(first[k], second[k]) for k in first)


def test_another_seed_gives_another_sample(sample, tmp_path):
    root, catalog = sample
    other = synthetic.generate(tmp_path / "other", SMALL, seed=1, progress=False)
    assert not catalog.time_utc.equals(other.time_utc)
    assert not catalog.id.equals(other.id)
    vil_one = np.concatenate([a.ravel() for a in read_all_vil(root).values()])
    vil_two = np.concatenate([a.ravel() for a in read_all_vil(tmp_path / "other").values()])
    assert vil_one.shape == vil_two.shape and not np.array_equal(vil_one, vil_two)


# ----------------------------------------------------------- what VIL looks like
def test_kgm2_to_vil_inverts_sevir_decoding():
    stored = np.arange(256)
    round_trip = _fields.kgm2_to_vil(sevir.vil_to_kgm2(stored))
    kept = stored > 5  # 0..5 all decode to 0 kg/m^2, stored back as 0
    assert np.array_equal(round_trip[kept], stored[kept]) and (round_trip[~kept] == 0).all()


def test_most_pixels_are_near_zero_with_a_heavy_tail(events):
    vil = np.stack(events)
    assert 0.5 <= (vil < 16).mean() <= 0.9
    assert (vil >= 133).mean() >= 0.005
    assert (vil >= 181).mean() >= 0.0005
    assert (vil >= 219).any()


def test_fields_change_so_persistence_degrades_with_lead_time(events):
    t0 = SMALL.frames // 2
    vil = [e.astype(np.float32) / 255 for e in events]
    lead1 = np.mean([np.mean((v[..., t0 + 1] - v[..., t0]) ** 2) for v in vil])
    lead12 = np.mean([np.mean((v[..., t0 + 12] - v[..., t0]) ** 2) for v in vil])
    assert lead12 > 5 * lead1 > 0


def _shift(frame: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """``frame`` moved by (dy, dx) pixels, zeros where nothing came in."""
    out = np.zeros_like(frame)
    h, w = frame.shape
    out[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = frame[
        max(-dy, 0) : h - max(dy, 0), max(-dx, 0) : w - max(dx, 0)
    ]
    return out


def _best_shift(before: np.ndarray, after: np.ndarray, radius: int) -> tuple[int, int]:
    """Integer shift taking ``before`` closest (MSE over the overlap) to ``after``."""
    h, w = before.shape
    scores = {}
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            a = before[max(-dy, 0) : h - max(dy, 0), max(-dx, 0) : w - max(dx, 0)]
            b = after[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)]
            scores[dy, dx] = np.mean((a - b) ** 2)
    return min(scores, key=scores.get)


def test_shift_extrapolation_beats_persistence_but_is_not_perfect(events):
    # An optical-flow-like oracle: the global shift seen over the last 30 min of input,
    # applied again for a 30-min forecast. Both forecasts are scored on the pixels the
    # shifted frame covers.
    t0, lead = SMALL.frames // 2, 6
    persistence, extrapolation = [], []
    for event in events:
        vil = event.astype(np.float32) / 255
        dy, dx = _best_shift(vil[..., t0 - lead], vil[..., t0], radius=SMALL.size // 4)
        covered = _shift(np.ones_like(vil[..., t0]), dy, dx) > 0
        truth = vil[..., t0 + lead][covered]
        persistence.append(np.mean((vil[..., t0][covered] - truth) ** 2))
        extrapolation.append(np.mean((_shift(vil[..., t0], dy, dx)[covered] - truth) ** 2))
    ratio = np.mean(extrapolation) / np.mean(persistence)
    assert 0.05 < ratio < 0.75


# ------------------------------------------------------------- robustness
def test_interrupted_generation_leaves_no_directory(tmp_path, monkeypatch):
    render = _fields.render_event
    calls = []

    def fail_on_the_fifth_event(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return render(*args, **kwargs)

    monkeypatch.setattr(_fields, "render_event", fail_on_the_fifth_event)
    with pytest.raises(KeyboardInterrupt):
        synthetic.generate(tmp_path / "raw", TINY, seed=0, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_cli_writes_a_sample(tmp_path):
    synthetic.main(["--out", str(tmp_path / "cli"), "--events", "3", "--size", "16", "--frames", "2", "--seed", "7"])
    catalog = sevir.read_catalog(tmp_path / "cli")
    assert catalog.drop_duplicates("id").img_type.eq("vil").sum() == 3
    assert (catalog.size_x[catalog.img_type == "vil"] == 16).all()
