"""The embedded SEVIR-format sample generator (``data.source: synthetic``, the default).

:func:`generate` writes a directory laid out exactly like the SEVIR bucket's ``data/``
folder (see :mod:`pipeline.sevir`), so every later stage runs unchanged on it::

    CATALOG.csv                                        the 21 SEVIR columns
    vil/2018/SEVIR_VIL_STORMEVENTS_2018_0101_0630.h5   id (N,) bytes, vil (N, H, W, T) uint8
    vil/2018/SEVIR_VIL_RANDOMEVENTS_2018_0701_1231.h5
    ...

Events
    ``n_events`` events with ``time_utc`` spread evenly (one per equal slice of time,
    at a random moment within it) from ``first_day`` to ``last_day``, so a chronological
    train/val/test split finds events in every part. A share ``storm_fraction`` are storm
    events (id ``S<event_id>``, numeric ``episode_id``/``event_id``, an NWS ``event_type``
    such as 'Hail'); the rest are random samples (id ``R<yymmddHHMM><n>``, no episode,
    event id or type), which are on the whole quieter. Each event's field comes from its
    own seed, derived from ``seed`` and the event's number, so one seed always gives the
    same catalog and byte-identical ``vil`` arrays.

Fields
    Radar-like VIL (see :mod:`pipeline.sevir._fields`): stratiform envelopes with embedded
    convective cores that grow, decay and merge, carried by a smooth, slowly turning flow,
    textured by advected power-law noise. Persistence is a poor forecast; extrapolating
    the motion is better but not perfect. At the default 128 x 128 about 70 % of pixels
    are below 16 on the 0-255 scale, a few % reach 133 and under 1 % reach 181.

Files
    Events go into the file of their kind, year and half-year
    (``..._<year>_0101_0630.h5`` / ``..._0701_1231.h5``), in time order. A file holds at
    most ``events_per_file`` events; a half-year with more is split, on day boundaries,
    into files named by the date ranges they cover (``..._0101_0214.h5``,
    ``..._0215_0630.h5``), as the real RANDOMEVENTS files are. Only a single day with more
    events than ``events_per_file`` gets numbered parts (``..._0301_0301_1.h5``, ``_2``).

Deliberate imperfections (few and deterministic, as in the real catalog; the chunk stage
must filter them, see :func:`pipeline.sevir.vil_rows`):
    * duplicate rows: the VIL rows of 2 events (the ones at 1/2 and 3/4 of the time
      order) appear twice, identically (same id, file and index);
    * missing data: 2 events (at 1/10 and 3/10 of the time order; 1 when there are
      fewer than 10 events, none below 5) have ``pct_missing`` > 0 and a block of their
      ``vil`` zeroed (a radar outage). They sit early in the period, in the training part
      of the default split, so filtering them never empties a split;
    * other image types: 2 events (at 1/3 and 5/6 of the time order) also have
      ``ir069``, ``ir107`` and ``vis`` rows, as SEVIR lists every image type. Their files
      do not exist: a VIL pipeline must keep ``img_type == 'vil'`` rows only.

The whole directory is written into a temporary sibling and renamed into place at the
end (:func:`pipeline.sevir.atomic_dir`): an interrupted run leaves nothing behind.
Events are generated and written one at a time, so memory stays at one event.

CLI (a convenience; the fetch stage calls :func:`generate`)::

    python -m pipeline.sevir.synthetic --out data/sample [--events 100 --size 128 --seed 0]
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
from pydantic import ValidationError

from pipeline import sevir
from pipeline.cli import setup_logging
from pipeline.config import SyntheticSource
from pipeline.sevir import _fields

log = logging.getLogger("pipeline.sevir.synthetic")

# NWS storm-event types of SEVIR's storm events, roughly in their proportions.
EVENT_TYPES = ("Thunderstorm Wind", "Hail", "Flash Flood", "Heavy Rain", "Tornado")
_EVENT_TYPE_WEIGHTS = (0.42, 0.28, 0.12, 0.12, 0.06)
# Image types besides VIL that get catalog rows for a few events: km per pixel, plausible (min, max).
_OTHER_IMAGE_TYPES = {"ir069": (2.0, (-75.0, -25.0)), "ir107": (2.0, (-65.0, 25.0)), "vis": (0.5, (0.02, 0.9))}
_EARTH_RADIUS_M = 6370997.0  # the sphere of sevir.PROJ
_PROJ_LAT0, _PROJ_LON0 = 38.0, -98.0
# Where frames may lie, in the projection's metres: roughly the contiguous US.
_DOMAIN_X_M, _DOMAIN_Y_M = (-1.9e6, 2.0e6), (-1.4e6, 1.1e6)
_HALVES = (("0101", "0630"), ("0701", "1231"))


@dataclass(frozen=True)
class PlannedEvent:
    """Catalog facts of one event, decided before any field is drawn."""

    number: int  # position in time order; also picks the event's field seed
    id: str
    storm: bool
    time_utc: dt.datetime
    episode_id: float  # NaN for random events
    event_id: float
    event_type: str  # "" for random events
    corners: tuple[float, float, float, float]  # llcrnrlat, llcrnrlon, urcrnrlat, urcrnrlon
    missing: bool  # gets pct_missing > 0 and a zeroed block
    duplicated: bool  # its VIL row appears twice
    other_images: bool  # also has ir069 / ir107 / vis rows

    @property
    def kind(self) -> str:
        return "STORMEVENTS" if self.storm else "RANDOMEVENTS"

    @property
    def half(self) -> int:
        return 0 if self.time_utc.month <= 6 else 1


@dataclass(frozen=True)
class PlannedFile:
    """One h5 file of the sample: which events it holds, in order, and its SEVIR-style name."""

    year: int
    kind: str
    start_mmdd: str
    end_mmdd: str
    part: int  # 0 unless one day had to be split over several files
    events: tuple[PlannedEvent, ...]

    def file_name(self, img_type: str = "vil") -> str:
        """Catalog ``file_name``, e.g. ``vil/2018/SEVIR_VIL_STORMEVENTS_2018_0101_0630.h5``."""
        name = sevir.vil_file_name(self.year, self.kind, self.start_mmdd, self.end_mmdd)
        name = name.replace("vil/", f"{img_type}/", 1).replace("SEVIR_VIL_", f"SEVIR_{img_type.upper()}_", 1)
        return name if not self.part else name.removesuffix(".h5") + f"_{self.part}.h5"


def generate(root: Path, cfg: SyntheticSource, seed: int, progress: bool = True) -> pd.DataFrame:
    """Write a SEVIR-format sample into ``root`` (created or replaced) and return its catalog.

    ``root`` gets ``CATALOG.csv`` and ``vil/YYYY/SEVIR_VIL_*.h5``; the returned frame is
    ``CATALOG.csv`` as read back with pandas (``sevir.CATALOG_COLUMNS``, in order). Same
    ``cfg`` and ``seed``, same catalog and byte-identical ``vil`` arrays.
    """
    say = log.info if progress else log.debug
    started = time.perf_counter()
    field_seeds = np.random.SeedSequence([seed, 1]).spawn(cfg.n_events)
    events = plan_events(cfg, seed)
    files = plan_files(events, cfg.events_per_file)
    rows: list[dict[str, object]] = []
    done = 0
    with sevir.atomic_dir(Path(root)) as tmp:
        for planned in files:
            vil_path = tmp / planned.file_name()
            vil_path.parent.mkdir(parents=True, exist_ok=True)
            with h5py.File(vil_path, "w") as h5:
                h5.create_dataset("id", data=np.array([e.id.encode() for e in planned.events]))
                vil = h5.create_dataset(
                    "vil", shape=(len(planned.events), cfg.size, cfg.size, cfg.frames), dtype=np.uint8,
                    chunks=(1, cfg.size, cfg.size, cfg.frames),
                )  # fmt: skip
                for index, event in enumerate(planned.events):
                    rng = np.random.default_rng(field_seeds[event.number])
                    frames = _fields.render_event(rng, cfg.size, cfg.frames, event.storm)  # (H, W, T) uint8
                    pct_missing = _blank_block(frames, rng) if event.missing else 0.0
                    vil[index] = frames
                    rows.extend(_catalog_rows(event, planned, index, cfg, frames, pct_missing))
                    done += 1
            say("synthetic: wrote %s (%d events; %d/%d)", planned.file_name(), len(planned.events), done, cfg.n_events)
        # Rows in time order; an event's duplicate and other image types follow its VIL row.
        catalog = pd.DataFrame(rows).sort_values(["_number", "_rank"], kind="stable")
        catalog[sevir.CATALOG_COLUMNS].to_csv(tmp / sevir.CATALOG_NAME, index=False)
        written = pd.read_csv(tmp / sevir.CATALOG_NAME, low_memory=False)
    say(
        "synthetic: %d events (%dx%dx%d) in %d files, %d catalog rows -> %s in %.1f s",
        cfg.n_events, cfg.size, cfg.size, cfg.frames, len(files), len(written), root, time.perf_counter() - started,
    )  # fmt: skip
    return written


def plan_events(cfg: SyntheticSource, seed: int) -> list[PlannedEvent]:
    """The events of a sample, in time order: ids, times, kinds, places and imperfections."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0]))
    n = cfg.n_events
    start = dt.datetime.combine(cfg.first_day, dt.time())
    span_s = (cfg.last_day - cfg.first_day + dt.timedelta(days=1)).total_seconds()
    # One event per equal slice of the period, at a random moment in it: even, yet not regular.
    offsets_s = (np.arange(n) + rng.uniform(0.0, 1.0, n)) / n * span_s
    times = [start + dt.timedelta(minutes=int(s // 60)) for s in offsets_s]
    n_storm = round(n * cfg.storm_fraction)
    storm = np.zeros(n, bool)
    storm[rng.permutation(n)[:n_storm]] = True
    event_ids = 700_000 + rng.choice(max(300_000, 10 * n_storm), size=n_storm, replace=False)
    episode_ids = rng.integers(110_000, 160_000, n_storm)
    types = rng.choice(len(EVENT_TYPES), size=n_storm, p=_EVENT_TYPE_WEIGHTS)
    centre_x, centre_y = rng.uniform(*_DOMAIN_X_M, n), rng.uniform(*_DOMAIN_Y_M, n)

    missing = _ranks(n, (0.1, 0.3)[: min(2, n // 5)])
    duplicated = _ranks(n, (0.5, 0.75)[: min(2, n)])
    other_images = _ranks(n, (1 / 3, 5 / 6)[: min(2, n)])
    events = []
    storm_number = 0
    half_side_m = cfg.size * 1000.0 / 2.0
    for number in range(n):
        lat0, lon0 = _laea_to_latlon(centre_x[number] - half_side_m, centre_y[number] - half_side_m)
        lat1, lon1 = _laea_to_latlon(centre_x[number] + half_side_m, centre_y[number] + half_side_m)
        if storm[number]:  # SEVIR's storm ids are 'S' + the NWS event id
            ident, episode, event_id = f"S{event_ids[storm_number]}", episode_ids[storm_number], event_ids[storm_number]
            event_type = EVENT_TYPES[types[storm_number]]
            storm_number += 1
        else:
            ident, episode, event_id, event_type = f"R{times[number]:%y%m%d%H%M}{number:04d}", math.nan, math.nan, ""
        events.append(PlannedEvent(
            number=number, id=ident, storm=bool(storm[number]), time_utc=times[number],
            episode_id=float(episode), event_id=float(event_id), event_type=event_type,
            corners=(round(lat0, 6), round(lon0, 6), round(lat1, 6), round(lon1, 6)),
            missing=number in missing, duplicated=number in duplicated, other_images=number in other_images,
        ))  # fmt: skip
    return events


def plan_files(events: list[PlannedEvent], events_per_file: int) -> list[PlannedFile]:
    """Group events into files by kind, year and half-year, at most ``events_per_file`` each."""
    groups: dict[tuple[str, int, int], list[PlannedEvent]] = {}
    for event in events:
        groups.setdefault((event.kind, event.time_utc.year, event.half), []).append(event)
    files = []
    for (kind, year, half), members in sorted(groups.items()):
        first, last = (dt.datetime.strptime(f"{year}{mmdd}", "%Y%m%d").date() for mmdd in _HALVES[half])
        chunks = list(_pack_days(members, events_per_file))
        for i, (chunk, part) in enumerate(chunks):
            day = chunk[0].time_utc.date()
            if part:
                start, end = day, day
            else:
                start = first if i == 0 else chunks[i - 1][0][-1].time_utc.date() + dt.timedelta(days=1)
                end = last if i == len(chunks) - 1 else chunk[-1].time_utc.date()
            files.append(PlannedFile(year, kind, f"{start:%m%d}", f"{end:%m%d}", part, tuple(chunk)))
    return files


def _pack_days(events: list[PlannedEvent], per_file: int) -> Iterator[tuple[list[PlannedEvent], int]]:
    """Consecutive chunks of at most ``per_file`` events that never split a day, with a part number.

    The part number is 0 except for a day that alone holds more than ``per_file`` events:
    its pieces are numbered 1, 2, ...
    """
    days: dict[dt.date, list[PlannedEvent]] = {}
    for event in events:
        days.setdefault(event.time_utc.date(), []).append(event)
    current: list[PlannedEvent] = []
    for day_events in days.values():
        if len(day_events) > per_file:
            if current:
                yield current, 0
                current = []
            for k in range(0, len(day_events), per_file):
                yield day_events[k : k + per_file], k // per_file + 1
        elif len(current) + len(day_events) > per_file:
            yield current, 0
            current = list(day_events)
        else:
            current.extend(day_events)
    if current:
        yield current, 0


def _ranks(n: int, fractions: tuple[float, ...]) -> set[int]:
    """Event numbers at the given fractions of the time order (distinct where possible)."""
    return {min(int(f * n), n - 1) for f in fractions}


def _laea_to_latlon(x: float, y: float) -> tuple[float, float]:
    """Inverse of sevir.PROJ (Lambert azimuthal equal-area on a sphere): metres -> (lat, lon) degrees."""
    lat0, lon0 = math.radians(_PROJ_LAT0), math.radians(_PROJ_LON0)
    rho = math.hypot(x, y)
    if rho == 0.0:
        return _PROJ_LAT0, _PROJ_LON0
    c = 2.0 * math.asin(rho / (2.0 * _EARTH_RADIUS_M))
    lat = math.asin(math.cos(c) * math.sin(lat0) + y * math.sin(c) * math.cos(lat0) / rho)
    lon = lon0 + math.atan2(x * math.sin(c), rho * math.cos(lat0) * math.cos(c) - y * math.sin(lat0) * math.sin(c))
    return math.degrees(lat), math.degrees(lon)


def _blank_block(frames: np.ndarray, rng: np.random.Generator) -> float:
    """Zero a rectangle over a run of frames (a radar outage) in place; returns the percentage of pixels lost."""
    height, width, n_frames = frames.shape
    h, w = max(1, height // 3), max(1, width // 2)
    t_len = max(1, n_frames // 4)
    y0, x0 = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
    t0 = int(rng.integers(0, n_frames - t_len + 1))
    frames[y0 : y0 + h, x0 : x0 + w, t0 : t0 + t_len] = 0
    return round(100.0 * h * w * t_len / frames.size, 4)


def _catalog_rows(
    event: PlannedEvent, planned: PlannedFile, index: int, cfg: SyntheticSource, frames: np.ndarray, pct_missing: float
) -> list[dict[str, object]]:
    """The catalog rows of one event: its VIL row, a duplicate of it, and other image types, as planned."""
    half_frames = (cfg.frames - 1) // 2
    minute_offsets = ":".join(str(sevir.FRAME_MINUTES * (t - half_frames)) for t in range(cfg.frames))
    side_m = cfg.size * 1000
    lo, hi = sevir.vil_to_kgm2(np.array([frames.min(), frames.max()]))
    vil_row = {
        "id": event.id, "file_name": planned.file_name(), "file_index": index, "img_type": "vil",
        "time_utc": f"{event.time_utc:%Y-%m-%d %H:%M:%S}", "minute_offsets": minute_offsets,
        "episode_id": event.episode_id, "event_id": event.event_id, "event_type": event.event_type,
        "llcrnrlat": event.corners[0], "llcrnrlon": event.corners[1],
        "urcrnrlat": event.corners[2], "urcrnrlon": event.corners[3],
        "proj": sevir.PROJ, "size_x": cfg.size, "size_y": cfg.size, "height_m": side_m, "width_m": side_m,
        "data_min": round(float(lo), 6), "data_max": round(float(hi), 6), "pct_missing": pct_missing,
        "_number": event.number, "_rank": 0,
    }  # fmt: skip
    rows = [vil_row]
    if event.duplicated:
        rows.append({**vil_row, "_rank": 1})
    if event.other_images:
        for rank, (img_type, (km_per_pixel, (lo_other, hi_other))) in enumerate(_OTHER_IMAGE_TYPES.items(), start=2):
            pixels = max(1, round(cfg.size / km_per_pixel))
            rows.append({
                **vil_row, "file_name": planned.file_name(img_type), "img_type": img_type,
                "size_x": pixels, "size_y": pixels, "data_min": lo_other, "data_max": hi_other,
                "pct_missing": 0.0, "_rank": rank,
            })  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> None:
    defaults = SyntheticSource()
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.sevir.synthetic", description="Write a synthetic SEVIR-format VIL sample."
    )
    parser.add_argument("--out", type=Path, required=True, help="directory to write (replaced if it exists)")
    parser.add_argument(
        "--events", type=int, default=defaults.n_events, help=f"number of events (default {defaults.n_events})"
    )
    parser.add_argument(
        "--size", type=int, default=defaults.size, help=f"frame side in pixels (default {defaults.size})"
    )
    parser.add_argument(
        "--frames", type=int, default=defaults.frames, help=f"frames per event (default {defaults.frames})"
    )
    parser.add_argument(
        "--events-per-file", type=int, default=defaults.events_per_file, help="largest h5 file, in events"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = parser.parse_args(argv)
    if args.seed < 0:
        parser.error("--seed must be >= 0")
    try:
        cfg = SyntheticSource(
            n_events=args.events, size=args.size, frames=args.frames, events_per_file=args.events_per_file
        )
    except ValidationError as err:
        first = err.errors(include_url=False)[0]
        parser.error(f"{'.'.join(map(str, first['loc']))}: {first['msg']}")
    setup_logging()
    generate(args.out, cfg, args.seed)


if __name__ == "__main__":
    main()
