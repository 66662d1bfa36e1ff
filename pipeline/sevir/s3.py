"""Fetch SEVIR VIL files from the public S3 bucket (or an S3-compatible mirror).

:func:`fetch_s3` is the ``data.source: s3`` fetch. What it promises:

* **Unsigned.** Requests carry no signature; no credentials are looked up or needed.
* **Selective.** Only the VIL files holding the selected events are downloaded
  (``data.s3.years``, ``event_types``, ``max_events``, ``max_files``).
* **Atomic.** A file appears under its final name only complete and verified
  (``os.replace`` of its ``.part``); ``CATALOG.csv`` is written last, so its
  presence means the whole fetch finished.
* **Resumable.** A killed fetch resumes every partial file from its last byte
  (HTTP ``Range``) and never downloads a finished file again.
* **Verified.** Size always; content against the ETag (MD5, or multipart MD5
  when the part size can be found). The digest is computed from the bytes as they
  stream in, so a finished file is not read again (a resumed one: only the part
  kept from before).
* **Concurrent.** ``data.s3.concurrency`` files download at once, each with all of the above;
  when there are fewer files than that, each file is fetched as 8 MiB ranged parts by several
  streams, appended in order (the partial file stays a prefix of the object). The first error
  stops the other downloads between reads; their partial files are kept for the next run.
* **Retried.** Transient failures (5xx, 429, connection errors, timeouts, cut
  streams) are retried with exponential backoff, resuming from the bytes kept.
  Anything a user must fix (404, 403, a bad catalog) is one :class:`DataError` line.

Layout under ``root``::

    CATALOG.csv                        the bucket catalog restricted to the selected VIL rows
    vil/2019/SEVIR_VIL_*.h5            one per selected file (catalog ``file_name``)
    vil/2019/SEVIR_VIL_*.h5.part       a download in progress: bytes 0..N-1 of the object
    vil/2019/SEVIR_VIL_*.h5.part.json  what that partial was begun against: key, size, ETag
    .fetch/CATALOG.bucket.csv          the whole bucket catalog (cached, checked by ETag)
    .fetch/manifest.json               finished downloads: name -> key, size, ETag, how verified
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import math
import os
import re
import shutil
import threading
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pandas as pd
import urllib3.exceptions
from botocore import UNSIGNED
from botocore.config import Config as BotoConfig
from botocore.exceptions import (
    ClientError,
    FlexibleChecksumError,
    HTTPClientError,
    IncompleteReadError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError
from tqdm import tqdm

from pipeline.config import S3Source
from pipeline.errors import DataError
from pipeline.sevir import (
    CATALOG_NAME,
    REQUIRED_COLUMNS,
    SOURCE_ROOT_NAME,
    atomic_file,
    read_catalog,
    safe_join,
    selection,
)
from pipeline.sevir.verify import verify_vil_files

log = logging.getLogger("pipeline.fetch")

MiB = 1 << 20
CHUNK_BYTES = MiB  # bytes per network read; a kill loses at most this much of a partial file
RANGE_PART_BYTES = 8 * MiB  # one ranged GET when a file is fetched by several streams (TransferManager's size)
COMMON_PART_SIZE = 8 * MiB  # multipart chunk of the AWS CLI and boto3 upload defaults
MAX_BACKOFF_S = 60.0
STATE_DIR = ".fetch"
BUCKET_CATALOG = "CATALOG.bucket.csv"
MANIFEST_NAME = "manifest.json"

_CATALOG_HINT = "check data.s3.bucket, data.s3.catalog_key and data.s3.endpoint_url"
_DATA_HINT = "check data.s3.bucket/data_prefix (and data.s3.endpoint_url for a mirror)"
_TRANSIENT_CODES = {"RequestTimeout", "SlowDown", "InternalError", "ServiceUnavailable", "Throttling"}
_SINGLE_ETAG = re.compile(r"[0-9a-f]{32}")
_MULTIPART_ETAG = re.compile(r"[0-9a-f]{32}-(\d+)")


# ------------------------------------------------------------------------ the fetch
def fetch_s3(root: Path, cfg: S3Source, progress: bool = True, client: Any = None) -> pd.DataFrame:
    """Download the selected SEVIR VIL files and their catalog rows into ``root``; return that catalog.

    ``root/CATALOG.csv`` gets the bucket catalog's selected VIL rows (all columns, values as
    in the bucket) and ``root/<file_name>`` each file they reference. ``client`` defaults to
    :func:`make_client`. Raises :class:`DataError` with one actionable line on any problem
    a user can fix, or when transient errors outlast ``cfg.retries``.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    client = client if client is not None else make_client(cfg)
    fetcher = _Fetcher(client, root, cfg, progress)

    catalog_obj = fetcher.head(cfg.catalog_key, _CATALOG_HINT)
    catalog_path = root / STATE_DIR / BUCKET_CATALOG
    fetcher.download(catalog_obj, catalog_path)
    catalog = read_bucket_catalog(catalog_path, catalog_obj.uri)

    rows, files = select_vil_rows(catalog, cfg, source=catalog_obj.uri)
    targets = {name: safe_join(root, name) for name in files}  # refuse unsafe names before any download
    log.info(
        "selected %d VIL events in %d file(s) (years %s, event types %s)",
        len(rows), len(files), _join(cfg.years), _join(cfg.event_types) or "all",
    )  # fmt: skip

    objects = {name: fetcher.head(data_key(cfg, name), _DATA_HINT) for name in files}
    _check_free_space(root, [(objects[n], targets[n]) for n in files])
    fetched = fetcher.download_all([(objects[n], targets[n]) for n in files], cfg.concurrency)

    pointer = root / SOURCE_ROOT_NAME  # left by an earlier data.source: local; the files are here now
    if pointer.exists():
        log.info("removing %s (left by data.source: local)", pointer)
        pointer.unlink()
    verify_vil_files(rows, root, "delete that file and rerun fetch; if it persists, check data.s3.bucket/data_prefix")
    with atomic_file(root / CATALOG_NAME) as tmp:
        rows.to_csv(tmp, index=False)
    log.info(
        "fetch done: %d file(s), %s downloaded, %d already present; wrote %s with %d events",
        len(files), _size(fetcher.bytes_downloaded), len(files) - fetched, root / CATALOG_NAME, len(rows),
    )  # fmt: skip
    return read_catalog(root)


def make_client(cfg: S3Source) -> Any:
    """A boto3 S3 client sending unsigned requests to ``cfg.endpoint_url`` (AWS when None).

    botocore's own retries are off: :func:`fetch_s3` retries itself, because a retry
    must resume the partial file and follow ``data.s3.retries``/``backoff_s``.
    """
    options: dict[str, Any] = {
        "signature_version": UNSIGNED,
        "region_name": cfg.region,
        "retries": {"mode": "standard", "total_max_attempts": 1},
        "connect_timeout": 10,
        "read_timeout": 60,
        "max_pool_connections": max(10, cfg.concurrency + 2),  # one connection per download thread, and HEADs
    }
    if cfg.endpoint_url:
        options["s3"] = {"addressing_style": "path"}  # what S3-compatible mirrors understand
    return boto3.session.Session().client("s3", endpoint_url=cfg.endpoint_url, config=BotoConfig(**options))


def data_key(cfg: S3Source, file_name: str) -> str:
    """The bucket key of a catalog ``file_name``: ``<data_prefix>/<file_name>``."""
    prefix = cfg.data_prefix.strip("/")
    return f"{prefix}/{file_name}" if prefix else file_name


# ------------------------------------------------------------------------ selection
def read_bucket_catalog(path: Path, source: str) -> pd.DataFrame:
    """The bucket catalog with every value kept as text, so rows are written back unchanged."""
    try:
        catalog = pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise DataError(f"{source}: not a readable CSV ({err}); {_CATALOG_HINT}") from None
    missing = [c for c in [*REQUIRED_COLUMNS, "event_type"] if c not in catalog.columns]
    if missing:
        raise DataError(f"{source}: missing column(s) {', '.join(missing)}; not a SEVIR catalog ({_CATALOG_HINT})")
    return catalog


def select_vil_rows(catalog: pd.DataFrame, cfg: S3Source, source: str = CATALOG_NAME) -> tuple[pd.DataFrame, list[str]]:
    """Pick the catalog rows and files to fetch (``data.s3.years``, ``event_types``, ``max_events``,
    ``max_files``); see :func:`pipeline.sevir.selection.select_vil_rows`."""
    return selection.select_vil_rows(catalog, cfg.years, cfg.event_types, max_events=cfg.max_events,
                                     max_files=cfg.max_files, source=source, keys="data.s3")  # fmt: skip


# ------------------------------------------------------------------------ downloads
@dataclass(frozen=True)
class RemoteObject:
    """One S3 object as ``head_object`` described it."""

    bucket: str
    key: str
    size: int
    etag: str  # without the surrounding quotes; may be "" on odd mirrors

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}"

    def identity(self) -> dict[str, Any]:
        """What a partial or finished copy must match to belong to this object version."""
        return {"key": self.key, "size": self.size, "etag": self.etag}


@dataclass(frozen=True)
class RetryPolicy:
    """``retries`` retries after the first attempt, waiting ``backoff_s * 2**(n-1)`` (capped) before retry n."""

    retries: int
    backoff_s: float

    def wait_or_give_up(self, uri: str, err: BaseException, failures: int, kept: str = "") -> None:
        """Sleep before retry number ``failures``, or raise DataError when the retries are used up."""
        if failures > self.retries:
            raise DataError(
                f"{uri}: giving up after {failures} failed attempt(s) ({_describe(err)}); "
                f"check the network and data.s3.endpoint_url, then rerun fetch{kept}"
            ) from None
        delay = min(self.backoff_s * 2 ** (failures - 1), MAX_BACKOFF_S)
        log.warning("%s: %s; retry %d/%d in %.1f s", uri, _describe(err), failures, self.retries, delay)
        time.sleep(delay)


class ChecksumMismatch(Exception):
    """Downloaded bytes do not match the object's size or ETag."""


class _Stopped(Exception):
    """Another download failed: this one stops at its next read, keeping its partial file."""


class _NoRanges(Exception):
    """The server answered a Range request with the whole object."""


class _ShortResponse(Exception):
    """A response ended cleanly but before the end of the object (retried like a cut stream)."""


class _Fetcher:
    """Downloads objects of one bucket into one root, sharing client, retry policy and manifest."""

    def __init__(self, client: Any, root: Path, cfg: S3Source, progress: bool):
        self.client = client
        self.root = root
        self.bucket = cfg.bucket
        self.policy = RetryPolicy(cfg.retries, cfg.backoff_s)
        self.part_sizes = tuple(dict.fromkeys([cfg.part_size_mb * MiB, COMMON_PART_SIZE]))
        self.manifest = Manifest(root / STATE_DIR / MANIFEST_NAME)
        self.progress = progress
        self.bytes_downloaded = 0
        self._lock = threading.Lock()  # bytes_downloaded and the manifest, shared by download threads
        self._stop = threading.Event()  # set on the first failure: the other downloads stop between reads
        self.streams_per_file = 1  # ranged GETs in flight per file (download_all sets it)

    def download_all(self, items: Sequence[tuple[RemoteObject, Path]], concurrency: int) -> int:
        """Download every ``(object, target)``, ``concurrency`` at a time; return how many were downloaded.

        The first failure (or Ctrl-C) stops the other downloads at their next read; their partial
        files stay, to be resumed by the next run, and that first error is raised.
        """
        n = len(items)
        # Connections left over when there are fewer files than data.s3.concurrency fetch ranged parts.
        self.streams_per_file = max(1, concurrency // max(1, min(concurrency, n)))
        if concurrency <= 1 or n <= 1:
            fetched = 0
            for i, (obj, target) in enumerate(items, 1):
                log.info("[%d/%d] %s (%s)", i, n, target.relative_to(self.root).as_posix(), _size(obj.size))
                fetched += self.download(obj, target)
            return fetched
        workers = min(concurrency, n)
        log.info("downloading %d file(s), %d at a time (data.s3.concurrency)", n, workers)
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fetch")
        futures = [pool.submit(self._download_logged, i, n, obj, target) for i, (obj, target) in enumerate(items, 1)]
        try:
            wait(futures, return_when=FIRST_EXCEPTION)
        except BaseException:  # Ctrl-C while waiting
            self._stop.set()
            raise
        finally:
            if any(f.done() and not f.cancelled() and f.exception() is not None for f in futures):
                self._stop.set()
            for future in futures:
                future.cancel()
            pool.shutdown(wait=True)
        errors = [f.exception() for f in futures if f.done() and not f.cancelled() and f.exception() is not None]
        first = next((e for e in errors if not isinstance(e, _Stopped)), None)
        if first is not None:
            raise first
        return sum(bool(f.result()) for f in futures)

    def _download_logged(self, i: int, n: int, obj: RemoteObject, target: Path) -> bool:
        if self._stop.is_set():
            raise _Stopped()
        log.info("[%d/%d] %s (%s)", i, n, target.relative_to(self.root).as_posix(), _size(obj.size))
        return self.download(obj, target)

    def head(self, key: str, hint: str) -> RemoteObject:
        """Size and ETag of ``key``; 404/403 become a DataError with ``hint``."""
        uri = f"s3://{self.bucket}/{key}"
        failures = 0
        while True:
            try:
                meta = self.client.head_object(Bucket=self.bucket, Key=key)
                return RemoteObject(self.bucket, key, int(meta["ContentLength"]), str(meta.get("ETag", "")).strip('"'))
            except Exception as err:  # noqa: BLE001 - classified just below
                _raise_unless_transient(err, uri, hint)
                failures += 1
                self.policy.wait_or_give_up(uri, err, failures)

    def download(self, obj: RemoteObject, target: Path) -> bool:
        """Make ``target`` a verified copy of ``obj``; True if it was downloaded, False if already there.

        The bytes go to ``target.part`` (resumed if it was begun against the same object
        version) and are renamed onto ``target`` only once complete and verified. A
        verification failure discards the partial and downloads once more from scratch;
        a second failure raises DataError and leaves neither the partial nor ``target``.
        """
        name = target.relative_to(self.root).as_posix()
        if self._finished(obj, target, name):
            return False
        part = part_path(target)
        for attempt in (1, 2):
            try:
                how = self._download_part(obj, part, name)
                break
            except (ChecksumMismatch, FlexibleChecksumError) as err:
                _discard(part)
                if attempt == 2:
                    raise DataError(
                        f"{obj.uri}: downloaded data failed verification twice ({err}); the partial file was "
                        "deleted. A proxy or mirror may be altering data (check data.s3.endpoint_url); rerun fetch"
                    ) from None
                log.warning(
                    "%s: downloaded data failed verification (%s); downloading again from scratch", obj.uri, err
                )
        os.replace(part, target)
        sidecar_path(part).unlink(missing_ok=True)
        with self._lock:
            self.manifest.record(name, obj, how)
        log.info("%s: done (%s, verified by %s)", name, _size(obj.size), how)
        return True

    def _finished(self, obj: RemoteObject, target: Path, name: str) -> bool:
        """Whether ``target`` already is a complete copy of ``obj`` (manifest entry, else size)."""
        if not target.is_file():
            return False
        size = target.stat().st_size
        if size != obj.size:
            log.warning("%s: local copy has %d bytes, %s has %d; downloading again", name, size, obj.uri, obj.size)
            return False
        entry = self.manifest.get(name)
        if entry is not None and all(entry.get(k) == v for k, v in obj.identity().items()):
            log.info("%s: already downloaded (%s, ETag matches); skipping", name, _size(size))
            return True
        if entry is not None and entry.get("etag") != obj.etag:
            log.warning(
                "%s: %s changed since it was downloaded (ETag %s -> %s); downloading again",
                name,
                obj.uri,
                entry.get("etag"),
                obj.etag,
            )
            return False
        log.info("%s: present with the right size (%s, no download record); skipping", name, _size(size))
        with self._lock:
            self.manifest.record(name, obj, "size (found in place)")
        return True

    def _download_part(self, obj: RemoteObject, part: Path, name: str) -> str:
        """Complete ``part`` from its current length and verify it; return how it was verified."""
        have = prepare_part(part, obj)
        digest = StreamDigest(obj.etag, obj.size, self.part_sizes)
        if have and digest.wanted:
            digest.update_from_file(part, have)  # the bytes kept from an earlier run; the rest is hashed as it arrives
        bar = tqdm(
            total=obj.size, initial=have, desc=name.rsplit("/", 1)[-1], disable=not self.progress,
            unit="B", unit_scale=True, unit_divisor=1024, dynamic_ncols=True, leave=False,
        )  # fmt: skip
        with bar:
            self._transfer(obj, part, bar, digest)
        return verify_file(part, obj.size, obj.etag, self.part_sizes, what=obj.uri, digest=digest)

    def _transfer(self, obj: RemoteObject, part: Path, bar: tqdm, digest: StreamDigest) -> None:
        """Append to ``part`` until it holds the whole object, retrying transient errors.

        Every retry resumes from the bytes already on disk. The failure count restarts
        after an attempt that made progress, so a long download over a flaky link is not
        abandoned while it advances.
        """
        if self.streams_per_file > 1 and obj.size - part.stat().st_size > RANGE_PART_BYTES:
            try:
                self._transfer_ranged(obj, part, bar, digest, self.streams_per_file)
                return
            except _NoRanges:
                log.warning("%s: server ignored a Range request; going on with one stream", obj.uri)
        failures = 0
        while (have := part.stat().st_size) < obj.size:
            try:
                self._append_range(obj, part, have, bar, digest)
            except Exception as err:  # noqa: BLE001 - classified just below
                _raise_unless_transient(err, obj.uri, _DATA_HINT)
                now = part.stat().st_size
                failures = 1 if now > have else failures + 1
                kept = f" (the {_size(now)} already downloaded are kept and resumed)" if now else ""
                self.policy.wait_or_give_up(obj.uri, err, failures, kept)

    def _transfer_ranged(self, obj: RemoteObject, part: Path, bar: tqdm, digest: StreamDigest, streams: int) -> None:
        """Complete ``part`` with ``streams`` ranged GETs in flight, appending the parts in order.

        Parts of :data:`RANGE_PART_BYTES` are fetched into memory by a small pool (each part
        retried on its own, resuming within the part) and appended to ``part`` strictly in
        order, so ``part`` stays a prefix of the object: a kill loses at most the parts in
        memory (``streams`` x 8 MiB), resume, streaming digest and verification work as with
        one stream. Raises :class:`_NoRanges` if the server ignores Range (nothing appended).
        """
        have = part.stat().st_size
        starts = iter(range(have, obj.size, RANGE_PART_BYTES))
        halt = threading.Event()
        pool = ThreadPoolExecutor(max_workers=streams, thread_name_prefix="fetch-range")
        queue: collections.deque[tuple[int, Future]] = collections.deque()

        def submit() -> None:
            start = next(starts, None)
            if start is not None:
                end = min(start + RANGE_PART_BYTES, obj.size)
                queue.append((start, pool.submit(self._get_part, obj, start, end, halt)))

        try:
            for _ in range(streams + 1):  # one part ahead of the streams, so none idles while a part is written
                submit()
            with part.open("ab", buffering=0) as out:
                while queue:
                    start, future = queue.popleft()
                    data = future.result()  # bytes start:start+len(data), right after what the file holds
                    _write(out, data, part)
                    digest.update(data)
                    with self._lock:
                        self.bytes_downloaded += len(data)
                    bar.update(len(data))
                    submit()
        finally:
            halt.set()
            for _, future in queue:
                future.cancel()
            pool.shutdown(wait=True)

    def _get_part(self, obj: RemoteObject, start: int, end: int, halt: threading.Event) -> bytearray:
        """Bytes ``start:end`` of this exact object version, retrying transient errors."""
        data = bytearray()
        failures = 0
        while start + len(data) < end:
            have = len(data)
            try:
                self._read_range(obj, start + len(data), end, data, halt)
            except Exception as err:  # noqa: BLE001 - classified just below
                _raise_unless_transient(err, obj.uri, _DATA_HINT)
                failures = 1 if len(data) > have else failures + 1
                self.policy.wait_or_give_up(obj.uri, err, failures)
        return data

    def _get_object(self, obj: RemoteObject, byte_range: str | None) -> dict[str, Any]:
        """GET this exact version of ``obj`` (If-Match its ETag), or ``byte_range`` of it; an object
        that changed since it was listed raises the one-line error, whichever way the server says so."""
        request: dict[str, Any] = {"Bucket": obj.bucket, "Key": obj.key}
        if obj.etag:
            request["IfMatch"] = f'"{obj.etag}"'
        if byte_range:
            request["Range"] = byte_range
        try:
            response = self.client.get_object(**request)
        except ClientError as err:
            if _status(err) == 412:
                raise _changed(obj) from None
            raise
        if obj.etag and str(response.get("ETag", "")).strip('"') not in ("", obj.etag):
            response["Body"].close()
            raise _changed(obj)
        return response

    def _read_range(self, obj: RemoteObject, start: int, end: int, into: bytearray, halt: threading.Event) -> None:
        """One GET of bytes ``start:end``, appended to ``into``."""
        response = self._get_object(obj, f"bytes={start}-{end - 1}")
        with closing(response["Body"]) as body:
            if not response.get("ContentRange"):
                raise _NoRanges()
            if _range_start(response["ContentRange"]) != start:
                raise DataError(
                    f"{obj.uri}: asked for bytes from {start}, got {response['ContentRange']}; {_DATA_HINT}"
                )
            before = len(into)
            for chunk in body.iter_chunks(CHUNK_BYTES):
                if halt.is_set() or self._stop.is_set():
                    raise _Stopped()
                into += chunk
        got = len(into) - before
        if got > end - start:
            raise DataError(f"{obj.uri}: asked for {end - start} bytes from {start}, got {got}; {_DATA_HINT}")
        if got < end - start:
            raise _ShortResponse(f"response ended at byte {start + got} of {end}")

    def _append_range(self, obj: RemoteObject, part: Path, offset: int, bar: tqdm, digest: StreamDigest) -> None:
        """One GET of bytes ``offset..`` of this exact object version, appended to ``part``."""
        response = self._get_object(obj, f"bytes={offset}-" if offset else None)
        mode = "ab"
        if offset and not response.get("ContentRange"):  # a server that ignores Range sends the whole object
            log.warning("%s: server ignored the Range request; restarting the file from byte 0", obj.uri)
            mode, offset = "wb", 0
            bar.reset(total=obj.size)
            digest.reset()
        elif _range_start(response.get("ContentRange")) != offset:
            raise DataError(f"{obj.uri}: asked for bytes from {offset}, got {response['ContentRange']}; {_DATA_HINT}")
        written = 0
        with part.open(mode, buffering=0) as out, closing(response["Body"]) as body:
            for chunk in body.iter_chunks(CHUNK_BYTES):
                if self._stop.is_set():
                    raise _Stopped()
                _write(out, chunk, part)
                digest.update(chunk)  # only bytes that are on disk: the digest always covers the part exactly
                written += len(chunk)
                with self._lock:
                    self.bytes_downloaded += len(chunk)
                bar.update(len(chunk))
        if offset + written < obj.size:
            raise _ShortResponse(f"response ended at byte {offset + written} of {obj.size}")


# ------------------------------------------------------------------ partial files
def part_path(target: Path) -> Path:
    """Where the bytes of ``target`` accumulate until it is complete: ``<target>.part``."""
    return target.with_name(target.name + ".part")


def sidecar_path(part: Path) -> Path:
    """The record of what ``part`` was begun against: ``<target>.part.json``."""
    return part.with_name(part.name + ".json")


def prepare_part(part: Path, obj: RemoteObject) -> int:
    """Keep ``part`` if it was begun against this object version, else start it empty; return its length.

    A partial is kept only when its sidecar records the same key, size and ETag and it is
    not longer than the object; otherwise the object changed (or the record is missing)
    and the file starts over.
    """
    sidecar = sidecar_path(part)
    have = part.stat().st_size if part.is_file() else 0
    if part.is_file() and _read_json(sidecar) == obj.identity() and have <= obj.size:
        if have:
            log.info("%s: resuming at %s of %s", obj.uri, _size(have), _size(obj.size))
        return have
    if part.exists() or sidecar.exists():
        log.info(
            "%s: partial download belongs to another version of the object (or has no record); starting over", obj.uri
        )
    _discard(part)
    part.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(sidecar) as tmp:
        tmp.write_text(json.dumps(obj.identity()))
    part.touch()
    return 0


def _discard(part: Path) -> None:
    """Delete a partial download and its sidecar (the part first, so a kill never leaves stale bytes with a fresh record)."""
    part.unlink(missing_ok=True)
    sidecar_path(part).unlink(missing_ok=True)


def _write(out: Any, chunk: bytes, part: Path) -> None:
    """Write all of ``chunk`` straight to the OS (``out`` is unbuffered), so a kill loses nothing written."""
    view = memoryview(chunk)
    try:
        while view:
            view = view[out.write(view) :]
    except OSError as err:
        raise DataError(
            f"{part}: cannot write ({err.strerror or err}); free disk space or change data.root, then rerun fetch"
        ) from None


def _check_free_space(root: Path, items: Sequence[tuple[RemoteObject, Path]]) -> None:
    """Refuse to start when the bytes still to download clearly do not fit on the disk."""
    needed = 0
    for obj, target in items:
        if target.is_file() and target.stat().st_size == obj.size:
            continue
        part = part_path(target)
        needed += obj.size - (part.stat().st_size if part.is_file() else 0)
    free = shutil.disk_usage(root).free
    if needed > free:
        raise DataError(
            f"{root}: {_size(needed)} still to download but only {_size(free)} free; free space or change data.root / data.s3.max_files"
        )


# -------------------------------------------------------------------- verification
def verify_file(path: Path, size: int, etag: str, part_sizes: Sequence[int], what: str = "",
                digest: StreamDigest | None = None) -> str:  # fmt: skip
    """Check ``path`` against an object's size and ETag; return how it was verified.

    Single-part ETags (32 hex digits) are the MD5 of the content. Multipart ETags
    (``<hex>-N``) are the MD5 of the N part MD5s, which depends on the upload's part
    size: every size in ``part_sizes`` that gives N parts is tried; when none matches the
    file is accepted on its size alone (logged at debug level). Raises
    :class:`ChecksumMismatch` when the size or an MD5 ETag does not match.

    ``digest``, when it covers the whole file (computed while the bytes streamed in), is used
    instead of reading the file again.
    """
    streamed = digest is not None and digest.wanted and digest.offset == size
    actual = path.stat().st_size
    if actual != size:
        raise ChecksumMismatch(f"{actual} bytes, expected {size}")
    if _SINGLE_ETAG.fullmatch(etag):
        md5 = digest.md5.hexdigest() if streamed and digest.md5 is not None else file_md5(path)
        if md5 != etag:
            raise ChecksumMismatch(f"MD5 {md5} does not match the ETag {etag}")
        return "MD5"
    multipart = _MULTIPART_ETAG.fullmatch(etag)
    if multipart:
        count = int(multipart[1])
        candidates = [p for p in part_sizes if max(1, math.ceil(size / p)) == count]
        etags = digest.multipart_etags() if streamed else multipart_etags(path, candidates)
        for part_size, computed in etags.items():
            if computed == etag:
                return f"multipart MD5 ({_size(part_size)} parts)"
        log.debug("%s: multipart ETag %s matches none of the part sizes tried (%s); verified by size only",
                  what, etag, ", ".join(_size(p) for p in part_sizes))  # fmt: skip
        return "size"
    log.debug("%s: ETag %r is not an MD5; verified by size only", what, etag)
    return "size"


def file_md5(path: Path) -> str:
    """Hex MD5 of a file, read in chunks."""
    with path.open("rb") as f:
        return hashlib.file_digest(f, lambda: hashlib.md5(usedforsecurity=False)).hexdigest()


def multipart_etags(path: Path, part_sizes: Sequence[int]) -> dict[int, str]:
    """The S3 multipart ETag the file would have if uploaded with each part size, in one read."""
    hashers = {p: _MultipartMD5(p) for p in part_sizes}
    if not hashers:
        return {}
    with path.open("rb") as f:
        for block in iter(lambda: f.read(MiB), b""):
            for hasher in hashers.values():
                hasher.update(block)
    return {p: h.etag() for p, h in hashers.items()}


class StreamDigest:
    """The digests an object's ETag needs, fed with its bytes in order as they are written.

    A single-part ETag needs the MD5 of the content; a multipart one (``<hex>-N``) the part MD5s
    for every part size in ``part_sizes`` that gives N parts; other ETags need nothing
    (``wanted`` is False). ``offset`` is how many bytes were fed.
    """

    def __init__(self, etag: str, size: int, part_sizes: Sequence[int]):
        self.etag, self.size, self.part_sizes = etag, size, tuple(part_sizes)
        self.reset()

    def reset(self) -> None:
        self.offset = 0
        self.md5 = hashlib.md5(usedforsecurity=False) if _SINGLE_ETAG.fullmatch(self.etag) else None
        multipart = _MULTIPART_ETAG.fullmatch(self.etag)
        count = int(multipart[1]) if multipart else -1
        self.parts = {p: _MultipartMD5(p) for p in self.part_sizes if max(1, math.ceil(self.size / p)) == count}

    @property
    def wanted(self) -> bool:
        return self.md5 is not None or bool(self.parts)

    def update(self, data: bytes) -> None:
        if self.md5 is not None:
            self.md5.update(data)  # hashlib releases the GIL: downloads in other threads go on
        for hasher in self.parts.values():
            hasher.update(data)
        self.offset += len(data)

    def update_from_file(self, path: Path, length: int) -> None:
        """Feed the first ``length`` bytes of ``path`` (a partial file kept from an earlier run)."""
        with path.open("rb") as f:
            while self.offset < length and (block := f.read(min(MiB, length - self.offset))):
                self.update(block)

    def multipart_etags(self) -> dict[int, str]:
        return {p: h.etag() for p, h in self.parts.items()}


class _MultipartMD5:
    """Incremental S3 multipart ETag: MD5 of the concatenated part MD5s, then ``-<parts>``."""

    def __init__(self, part_size: int):
        self.part_size = part_size
        self.digests: list[bytes] = []
        self.current = hashlib.md5(usedforsecurity=False)
        self.filled = 0

    def update(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            take = min(len(view), self.part_size - self.filled)
            self.current.update(view[:take])
            self.filled += take
            view = view[take:]
            if self.filled == self.part_size:
                self._close_part()

    def _close_part(self) -> None:
        self.digests.append(self.current.digest())
        self.current = hashlib.md5(usedforsecurity=False)
        self.filled = 0

    def etag(self) -> str:
        if self.filled or not self.digests:
            self._close_part()
        return f"{hashlib.md5(b''.join(self.digests), usedforsecurity=False).hexdigest()}-{len(self.digests)}"


# ------------------------------------------------------------------------ manifest
class Manifest:
    """Finished downloads under a root: name -> key, size, ETag and how verified; saved atomically."""

    def __init__(self, path: Path):
        self.path = path
        loaded = _read_json(path)
        self.entries: dict[str, dict[str, Any]] = loaded if isinstance(loaded, dict) else {}
        if path.exists() and not isinstance(loaded, dict):
            log.warning("%s: unreadable download record; finished files are re-checked by size", path)

    def get(self, name: str) -> dict[str, Any] | None:
        return self.entries.get(name)

    def record(self, name: str, obj: RemoteObject, verified: str) -> None:
        """Record ``name`` as a finished copy of ``obj`` and save the manifest."""
        self.entries[name] = obj.identity() | {"verified": verified}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(self.path) as tmp:
            tmp.write_text(json.dumps(self.entries, indent=1, sort_keys=True))


# ------------------------------------------------------------------------- helpers
def _raise_unless_transient(err: BaseException, uri: str, hint: str) -> None:
    """Return if ``err`` is worth retrying; otherwise raise it (a ClientError as one DataError line)."""
    if _is_transient(err):
        return
    if isinstance(err, ClientError):
        raise _client_error(err, uri, hint) from None
    raise err


def _is_transient(err: BaseException) -> bool:
    """5xx, 429, throttling, connection errors, timeouts and cut or short streams."""
    if isinstance(err, ClientError):
        status = _status(err)
        return status >= 500 or status == 429 or err.response.get("Error", {}).get("Code") in _TRANSIENT_CODES
    return isinstance(
        err, (HTTPClientError, BotoConnectionError, IncompleteReadError, _ShortResponse, urllib3.exceptions.HTTPError)
    )


def _client_error(err: ClientError, uri: str, hint: str) -> DataError:
    """One line for a 4xx answer: what happened to which object, and what to check."""
    status = _status(err)
    code = err.response.get("Error", {}).get("Code", "")
    if status == 404 or code in ("NoSuchKey", "NoSuchBucket", "NotFound"):
        what = "bucket not found" if code == "NoSuchBucket" else "not found"
        return DataError(f"{uri}: {what} (404); {hint}")
    if status == 403:
        return DataError(
            f"{uri}: access denied (403); requests are unsigned, so the object must be publicly readable; {hint}"
        )
    message = err.response.get("Error", {}).get("Message", "")
    return DataError(f"{uri}: request refused ({status} {code}{': ' + message if message else ''}); {hint}")


def _changed(obj: RemoteObject) -> DataError:
    return DataError(
        f"{obj.uri}: the object changed on the server during the download; rerun fetch to get the new version"
    )


def _status(err: ClientError) -> int:
    return int(err.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)


def _describe(err: BaseException) -> str:
    if isinstance(err, ClientError):
        error = err.response.get("Error", {})
        return f"HTTP {_status(err)} {error.get('Code', '')}".strip()
    return f"{type(err).__name__}: {err}"


def _range_start(content_range: str | None) -> int:
    """First byte of a ``Content-Range: bytes a-b/n`` answer; 0 for a whole-object answer."""
    match = re.match(r"bytes (\d+)-", content_range or "")
    return int(match[1]) if match else 0


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _size(n: int) -> str:
    """Human-readable byte count in binary units, e.g. ``8.0 MiB``."""
    if n < 1024:
        return f"{n} B"
    exponent = min(int(math.log(n, 1024)), 4)
    return f"{n / 1024**exponent:.1f} {'KMGT'[exponent - 1]}iB"


def _join(values: Sequence[Any]) -> str:
    return ", ".join(str(v) for v in values)
