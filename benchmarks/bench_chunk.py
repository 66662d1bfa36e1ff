"""Stage chunk: throughput against a plain h5py read of the same file, and peak memory.

    python benchmarks/bench_chunk.py [--events 60] [--small-events 20] [--size 384] [--repeat 5]

Builds a SEVIR-format VIL file (uncompressed, contiguous, N x H x W x T uint8) and a catalog
spreading its events over the three splits, then measures in one run:

  (a) a plain h5py read of the file, event by event (what any chunker that copies its reads pays);
  (b) the chunk pipeline (pipeline.sevir.windows.write_windows) over the same file: MB/s of raw VIL
      read and of split files written, and the ratios (b)/(a) and (b)/(c) (the target: (b)/(c) >= 0.8);
  a per-step split of (b) (read, to time-major, stats, writes) in ms per event;
  peak RSS of a child process running (b) on a small and on a large file.

Also (c), the I/O floor: (a) into a reused buffer plus writing as many frame chunks as the chunker
writes, untransformed, with h5py (each event is stored once: as many bytes as are read, at the
defaults); and (d), the stage's own I/O alone: each event mapped from the page cache as the stage
maps it and its frames written untransformed into chunks allocated up front, as the stage writes
them, on one thread. The stage avoids the read copy that (c) pays, so (b) may pass (c); (d) is the
least the stage's I/O calls cost, and (b)/(d) what the transform and the threads cost on top.

(a) to (d) are timed with the file in the page cache ("warm": it is read once first,
since dropping the whole cache needs root) and with the file's pages evicted by
posix_fadvise(DONTNEED) ("cold": read from the disk, or whatever caches sit below this VM).
Writes go to the page cache either way. Figures are medians over --repeat runs, ratios medians
of the ratios within each repeat (timed back to back; the order of (c), (d) and (b) rotates
between repeats, since on a VM whichever writer runs first after another can pay for the memory
the other freed); no asserts.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline import sevir  # noqa: E402
from pipeline.config import SplitConfig, WindowsConfig  # noqa: E402
from pipeline.sevir import kernels, windows  # noqa: E402

FILE_NAME = "vil/2019/SEVIR_VIL_STORMEVENTS_2019_0101_1231.h5"
SPLIT = SplitConfig()
BREAKDOWN_EVENTS = 10  # train <= 2019-01-01 < val <= 2019-06-01 < test


def make_sevir(root: Path, n_events: int, size: int, frames: int, seed: int = 0) -> Path:
    """A SEVIR root: one uncompressed VIL file of ``n_events`` events and its catalog."""
    path = root / FILE_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    with h5py.File(path, "w") as f:
        f.create_dataset("id", data=np.array([f"S{i:06d}".encode() for i in range(n_events)]))
        vil = f.create_dataset("vil", (n_events, size, size, frames), np.uint8)  # contiguous, no filters
        for i in range(n_events):
            event = rng.integers(0, 256, (size, size, frames), dtype=np.uint8)
            event[event < 140] = 0  # mostly dry, like real VIL
            vil[i] = event
    # 60% train, 20% val, 20% test, in file order
    first = {"train": dt.datetime(2018, 3, 1), "val": dt.datetime(2019, 2, 1), "test": dt.datetime(2019, 7, 1)}
    rows = []
    for i in range(n_events):
        split = "train" if i < 0.6 * n_events else "val" if i < 0.8 * n_events else "test"
        row = dict.fromkeys(sevir.CATALOG_COLUMNS, 0)
        row.update(id=f"S{i:06d}", file_name=FILE_NAME, file_index=i, img_type="vil", proj=sevir.PROJ,
                   time_utc=str(first[split] + dt.timedelta(hours=i)), minute_offsets="-120:120")  # fmt: skip
        rows.append(row)
    pd.DataFrame(rows, columns=sevir.CATALOG_COLUMNS).to_csv(root / sevir.CATALOG_NAME, index=False)
    return path


def evict(path: Path) -> None:
    """Drop ``path``'s pages from the page cache (no root needed for one file)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def prepare(path: Path, cache: str) -> None:
    """Put ``path`` in the page cache ("warm") or out of it ("cold"); flush dirty pages."""
    if cache == "cold":
        evict(path)
    else:
        plain_read(path)
    os.sync()  # each timed run starts with no dirty pages left by the previous one


def plain_read(path: Path) -> tuple[int, float]:
    """(bytes, seconds) of reading every event, one at a time."""
    began = time.perf_counter()
    total = 0
    with h5py.File(path, "r") as f:
        vil = f["vil"]
        for i in range(vil.shape[0]):
            total += vil[i].nbytes
    return total, time.perf_counter() - began


def io_floor(path: Path, out: Path, n_stored: int, factor: int) -> tuple[int, float]:
    """(bytes read, seconds) of reading every event into a reused buffer and writing as many
    frame chunks as the chunker writes, straight from that buffer: the I/O a chunker pays that reads
    and writes through h5py."""
    began = time.perf_counter()
    total = 0
    with h5py.File(path, "r") as src, h5py.File(out, "w", rdcc_nbytes=0) as dst:
        vil = src["vil"]
        n, h, w = vil.shape[0], vil.shape[1] // factor, vil.shape[2] // factor
        chunks = dst.create_dataset("vil", (n, n_stored, h, w), np.uint8, chunks=(1, 1, h, w))
        buffer = np.empty((1, *vil.shape[1:]), np.uint8)
        frames = buffer.reshape(-1)[: n_stored * h * w].reshape(n_stored, h, w)  # the same bytes, untransformed
        for i in range(n):
            vil.read_direct(buffer, source_sel=np.s_[i : i + 1])
            total += buffer.nbytes
            for t in range(n_stored):
                chunks.id.write_direct_chunk((i, t, 0, 0), frames[t])
    out.unlink()
    return total, time.perf_counter() - began


def stage_io(path: Path, out: Path, n_stored: int) -> tuple[int, float]:
    """(bytes read, seconds) of the stage's own I/O calls on one thread, without the transform:
    each event mapped (windows.read_block) and its first ``n_stored`` frames' bytes, untransformed,
    written with SplitWriter.write_row into chunks allocated up front."""
    began = time.perf_counter()
    total = 0
    with sevir.VilFile(path) as vil:
        n, h, w = vil.n_events, *vil.frame_shape
        writer = windows.SplitWriter(out, "train", WindowsConfig(), SPLIT, (h, w), 8, n, n_stored)
        scratch = np.empty(0, np.uint8)  # unused while the file maps
        for i in range(n):
            event = windows.read_block(vil, i, i + 1, scratch).reshape(-1)
            total += event.nbytes
            writer.append(f"S{i}", 0, 0, event[: n_stored * h * w].reshape(n_stored, h, w), [0])
        writer.close()
    out.unlink()
    return total, time.perf_counter() - began


def chunk_run(raw: Path, out: Path, chunk_events: int, downsample: int) -> tuple[dict, float, float]:
    """(stats, wall seconds, CPU seconds of all threads) of one run of the chunk pipeline."""
    cfg = WindowsConfig(root=out / "windows", chunk_events=chunk_events, downsample=downsample)
    began, cpu = time.perf_counter(), time.process_time()
    stats = windows.write_windows(raw, cfg, SPLIT, stats_path=out / "chunk_stats.json", progress=False)
    seconds, cpu = time.perf_counter() - began, time.process_time() - cpu
    shutil.rmtree(out / "windows")
    return stats, seconds, cpu


def step_breakdown(path: Path, out: Path, factor: int, n: int = BREAKDOWN_EVENTS) -> dict[str, dict[str, float]]:
    """ms per event of each step of the chunk loop, run one after another on the first ``n`` events:
    {"wall": {step: ms}, "cpu": {step: ms}} (CPU: this thread's time, steadier on a shared machine).

    "map" is the stage's read (the event's pages mapped, no copy), so "to time-major" reads the
    page cache itself. Besides the stage's steps it times four baselines: the read as a copy into
    a buffer (pread), the stats as whole-array numpy passes (one compare and one count per
    threshold over the event), the time-major copy as one ``np.copyto`` of the transposed view,
    and the stage's transpose into back-to-back frames instead of kernels.frame_buffer's (what the
    pad between frames saves).
    """
    cfg = WindowsConfig(downsample=factor)
    steps = ("map", "downsample", "to time-major", "stats", "write", "read, pread into a buffer",
             "stats, whole-array passes", "to time-major, np.copyto", "to time-major, back-to-back frames")  # fmt: skip
    times: dict[str, dict[str, list[float]]] = {"wall": {k: [] for k in steps}, "cpu": {k: [] for k in steps}}
    with sevir.VilFile(path) as vil:
        n = min(n, vil.n_events)
        grid = windows.Grid.of(vil.n_frames, cfg)
        shape = (vil.frame_shape[0] // factor, vil.frame_shape[1] // factor)
        writer = windows.SplitWriter(out / "steps.h5", "train", cfg, SPLIT, shape, 8, n, grid.n_stored)
        raw = np.empty(vil.vil.shape[1:], np.uint8)
        fd, offset = vil.contiguous()
        buffer = kernels.frame_buffer(grid.n_stored, *shape)  # as the stage: frames a cache line apart
        scratch = np.empty(buffer.size, bool)
        copy = np.empty(buffer.shape, np.uint8)  # back-to-back frames
        stats = windows.SplitStats()

        def whole_array_passes(frames: np.ndarray) -> list[int]:
            return [np.count_nonzero(np.greater_equal(frames, t, out=scratch.reshape(frames.shape)))
                    for t in sevir.VIL_THRESHOLDS]  # fmt: skip

        for i in range(n):
            clock = [(time.perf_counter(), time.thread_time())]
            event = windows.read_block(vil, i, i + 1, raw)[0]
            clock.append((time.perf_counter(), time.thread_time()))
            small = windows.downsample(event[:, :, grid.raw_slice], factor)
            clock.append((time.perf_counter(), time.thread_time()))
            frames = windows.to_time_major(small, out=buffer)
            clock.append((time.perf_counter(), time.thread_time()))
            stats.add_pixels(frames)
            clock.append((time.perf_counter(), time.thread_time()))
            writer.append("S0", 0, grid.frame_offset, frames, grid.stored_starts)
            clock.append((time.perf_counter(), time.thread_time()))
            os.preadv(fd, [raw], offset + i * raw.nbytes)
            clock.append((time.perf_counter(), time.thread_time()))
            whole_array_passes(frames)
            clock.append((time.perf_counter(), time.thread_time()))
            np.copyto(copy[: frames.shape[0]], small.transpose(2, 0, 1))
            clock.append((time.perf_counter(), time.thread_time()))
            windows.to_time_major(small, out=copy[: frames.shape[0]])
            clock.append((time.perf_counter(), time.thread_time()))
            for key, a, b in zip(steps, clock[:-1], clock[1:], strict=True):
                times["wall"][key].append((b[0] - a[0]) * 1e3)
                times["cpu"][key].append((b[1] - a[1]) * 1e3)
            del event, small, frames  # drop the mapping before the next one
        writer.close()
    (out / "steps.h5").unlink()
    return {kind: {key: statistics.median(v) for key, v in t.items()} for kind, t in times.items()}


def child_peak(raw: Path, out: Path, chunk_events: int) -> dict[str, float]:
    """Peak RSS (MB) of a fresh process running the chunk pipeline, and its RSS before it."""
    proc = subprocess.run([sys.executable, __file__, "--child", str(raw), str(out), str(chunk_events)],
                          capture_output=True, text=True, check=True)  # fmt: skip
    return json.loads(proc.stdout.strip().splitlines()[-1])


def child_main(raw: Path, out: Path, chunk_events: int) -> None:
    import psutil

    before = psutil.Process().memory_info().rss / 2**20
    chunk_run(raw, out, chunk_events, 1)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({"rss_before_mb": round(before, 1), "peak_rss_mb": round(peak, 1)}))


def rate(run: tuple[float, float]) -> float:
    """MB/s of a (bytes, seconds) run."""
    return run[0] / run[1] / 1e6


def median(values: list[float]) -> float:
    return statistics.median(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=60, help="events in the large file (default 60, ~430 MB)")
    parser.add_argument("--small-events", type=int, default=20, help="events in the small file, for peak memory")
    parser.add_argument("--size", type=int, default=384)
    parser.add_argument("--frames", type=int, default=49)
    parser.add_argument("--chunk-events", type=int, default=1)
    parser.add_argument("--downsample", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--workdir", type=Path, default=None, help="where to build the files (default: a temp dir)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(Path(args.child[0]), Path(args.child[1]), int(args.child[2]))
        return

    work = Path(tempfile.mkdtemp(prefix="bench_chunk_", dir=args.workdir))
    try:
        event_mb = args.size * args.size * args.frames / 1e6
        print(f"building SEVIR-format files in {work}: {args.events} and {args.small_events} events "
              f"of {args.size}x{args.size}x{args.frames} ({event_mb:.1f} MB each), uncompressed")  # fmt: skip
        large = make_sevir(work / "large", args.events, args.size, args.frames)
        make_sevir(work / "small", args.small_events, args.size, args.frames, seed=1)
        size_mb = large.stat().st_size / 1e6

        # The stage's compiled kernels load once per process (numba: ~0.5 s from its cache, more the
        # first time it compiles): paid here, reported, and kept out of the timed runs.
        began = time.perf_counter()
        windows.count_pixels(windows.to_time_major(np.zeros((8, 8, 8), np.uint8)))
        kernel_load = time.perf_counter() - began
        n_stored = windows.Grid.of(args.frames, WindowsConfig()).n_stored
        load_before = os.getloadavg()[0]
        rows = {}
        for cache in ("warm", "cold"):
            # Each repeat times (a), (c) and (b) back to back; ratios are taken within a repeat.
            runs: dict[str, list[float]] = {k: [] for k in ("a", "c", "d", "b", "w", "b/a", "b/c", "b/d", "cpu", "w/r")}
            for repeat in range(args.repeat):
                prepare(large, cache)
                a = rate(plain_read(large))
                figures = {}
                order = ("c", "d", "b")
                for key in order[repeat % 3 :] + order[: repeat % 3]:
                    prepare(large, cache)
                    if key == "c":
                        figures["c"] = rate(io_floor(large, work / "floor.h5", n_stored, args.downsample))
                    elif key == "d":
                        figures["d"] = rate(stage_io(large, work / "stage_io.h5", n_stored))
                    else:
                        stats, seconds, cpu = chunk_run(
                            work / "large", work / "out", args.chunk_events, args.downsample
                        )
                c, d = figures["c"], figures["d"]
                b, w = rate((stats["bytes_read"], seconds)), rate((stats["bytes_written"], seconds))
                for key, value in (("a", a), ("c", c), ("d", d), ("b", b), ("w", w), ("b/a", b / a), ("b/c", b / c),
                                   ("b/d", b / d), ("cpu", cpu / args.events * 1e3), ("w/r", w / b)):  # fmt: skip
                    runs[key].append(value)
            rows[cache] = runs
        steps = step_breakdown(large, work, args.downsample)
        peaks = {n: child_peak(root, work / f"peak{n}", args.chunk_events)
                 for n, root in ((args.small_events, work / "small"), (args.events, work / "large"))}  # fmt: skip
        load_after = os.getloadavg()[0]
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"\nfile: {args.events} events, {size_mb:.0f} MB; windows {WindowsConfig().window_len} frames, stride "
          f"{WindowsConfig().stride}, chunk_events {args.chunk_events}, downsample {args.downsample}; "
          f"median of {args.repeat}; {os.cpu_count()} CPUs, load average {load_before:.1f} -> {load_after:.1f}")  # fmt: skip
    print("\n(a) plain h5py read, event by event; (c) I/O floor: h5py reads into a reused buffer plus h5py writes")
    print("of the bytes the chunker writes, untransformed; (d) the stage's own I/O calls alone (events mapped,")
    print("frames written into chunks allocated up front), untransformed, one thread; (b) the chunk pipeline.")
    print("MB/s of raw VIL read unless marked 'written'. Ratios are medians of the ratios within each repeat")
    print("(min-max in brackets).")
    head = ("cache", "(a) read", "(c) floor", "(d) stage I/O", "(b) chunk", "(b) written", "(b)/(a)", "(b)/(c)", "(b)/(d)",
            "CPU/event")  # fmt: skip
    print(f"\n{head[0]:<6} {head[1]:>9} {head[2]:>9} {head[3]:>13} {head[4]:>9} {head[5]:>11} {head[6]:>18} {head[7]:>18} "
          f"{head[8]:>18} {head[9]:>10}")  # fmt: skip
    for cache, r in rows.items():
        span = {k: f"{median(r[k]):.2f} [{min(r[k]):.2f}-{max(r[k]):.2f}]" for k in ("b/a", "b/c", "b/d")}
        print(f"{cache:<6} {median(r['a']):>9.0f} {median(r['c']):>9.0f} {median(r['d']):>13.0f} {median(r['b']):>9.0f} "
              f"{median(r['w']):>11.0f} {span['b/a']:>18} {span['b/c']:>18} {span['b/d']:>18} {median(r['cpu']):>7.1f} ms")  # fmt: skip
    print(f"\nbytes written / bytes read: {median(rows['warm']['w/r']):.2f}; the stage's kernels loaded once per "
          f"process in {kernel_load:.2f} s (before the timed runs)")  # fmt: skip
    print(
        f"\nchunk loop steps run one after another, ms per event (warm, median of {BREAKDOWN_EVENTS} events); the stage"
    )
    print(
        f"maps events on its main thread and runs downsample + to-time-major + stats + write in "
        f"{windows.prepare_workers(WindowsConfig())} worker threads (windows.workers), all without the GIL:"
    )
    print(f"  {'step':<27} {'wall':>6} {'CPU':>6}")
    for step in steps["wall"]:
        if "," not in step:
            print(f"  {step:<27} {steps['wall'][step]:6.2f} {steps['cpu'][step]:6.2f}")
    print(
        f"  {'total':<27} {sum(v for k, v in steps['wall'].items() if ',' not in k):6.2f} "
        f"{sum(v for k, v in steps['cpu'].items() if ',' not in k):6.2f}"
    )
    for new, old in (("map", "read, pread into a buffer"), ("stats", "stats, whole-array passes"),
                     ("to time-major", "to time-major, np.copyto"), ("to time-major", "to time-major, back-to-back frames")):  # fmt: skip
        print(
            f"  (baseline {old}: {steps['wall'][old]:.2f} wall, {steps['cpu'][old]:.2f} CPU; "
            f"the stage's {new} takes {steps['cpu'][new] / steps['cpu'][old]:.2f}x its CPU time)"
        )
    print(f"\n{'file':<22} {'RSS before':>11} {'peak RSS':>10} {'peak - before':>14}")
    for n, peak in peaks.items():
        name = f"{n} events ({n * event_mb:.0f} MB)"
        print(f"{name:<22} {peak['rss_before_mb']:>8.0f} MB {peak['peak_rss_mb']:>7.0f} MB "
              f"{peak['peak_rss_mb'] - peak['rss_before_mb']:>11.0f} MB")  # fmt: skip
    warm, cold = median(rows["warm"]["b/a"]), median(rows["cold"]["b/a"])
    print(f"\nheadline: chunk at {median(rows['warm']['b/c']):.0%} (warm) / {median(rows['cold']['b/c']):.0%} (cold) of "
          f"the I/O floor (target >= 80%); {median(rows['warm']['b/d']):.0%} / {median(rows['cold']['b/d']):.0%} of its "
          f"own I/O alone; {warm:.0%} / {cold:.0%} of a plain read; peak RSS "
          + " vs ".join(f"{p['peak_rss_mb']:.0f} MB ({n} events)" for n, p in peaks.items()))  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "steps": steps, "peaks": peaks,
                                         "load": [load_before, load_after]}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
