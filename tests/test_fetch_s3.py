"""pipeline.sevir.s3.fetch_s3 against a real S3 protocol server on loopback.

A moto standalone server (in-process thread, free port on 127.0.0.1) holds a tiny
SEVIR-format bucket: CATALOG.csv (21 columns, VIL and non-VIL rows) and small VIL h5
files in two years. The fetcher talks to it through a small HTTP proxy, also on
127.0.0.1, that logs every request (method, key, Range, bytes sent) and injects
faults at the HTTP level: 5xx answers, cut or stalled bodies, corrupted bytes.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import boto3
import h5py
import numpy as np
import pandas as pd
import pytest
from botocore.config import Config as BotoConfig

from pipeline.config import S3Source
from pipeline.errors import DataError
from pipeline.sevir import CATALOG_COLUMNS, PROJ, SOURCE_ROOT_NAME, data_root_of, read_catalog, s3

REPO = Path(__file__).resolve().parents[1]
BUCKET = "sevir"
FRAMES, SIDE = 49, 16

# --------------------------------------------------------------------------- the synthetic bucket
FILE_2018 = "vil/2018/SEVIR_VIL_STORMEVENTS_2018_0101_0630.h5"
FILE_2019A = "vil/2019/SEVIR_VIL_STORMEVENTS_2019_0101_0630.h5"
FILE_2019B = "vil/2019/SEVIR_VIL_STORMEVENTS_2019_0701_1231.h5"
FILE_RANDOM = "vil/2019/SEVIR_VIL_RANDOMEVENTS_2019_0101_0430.h5"
# id, file, file_index, time_utc, event_type
EVENTS = [
    ("S1", FILE_2018, 0, "2018-05-01 12:00:00", "Hail"),
    ("S2", FILE_2018, 1, "2018-06-10 18:30:00", "Tornado"),
    ("S3", FILE_2019A, 0, "2019-03-01 15:00:00", "Hail"),
    ("S4", FILE_2019A, 1, "2019-04-02 21:05:00", "Thunderstorm Wind"),
    ("S5", FILE_2019B, 0, "2019-07-03 20:00:00", "Hail"),
    ("S6", FILE_2019B, 1, "2019-08-01 01:10:00", "Flash Flood"),
    ("R1", FILE_RANDOM, 0, "2019-02-01 06:00:00", ""),
    ("R2", FILE_RANDOM, 1, "2019-09-01 07:00:00", ""),
]
VIL_FILES = [FILE_2018, FILE_2019A, FILE_2019B, FILE_RANDOM]
IR_2019A = "ir069/2019/SEVIR_IR069_STORMEVENTS_2019_0101_0630.h5"
IR_2019B = "ir069/2019/SEVIR_IR069_STORMEVENTS_2019_0701_1231.h5"


def vil_h5(ids: list[str], seed: int, pad: int = 0) -> bytes:
    """A SEVIR-layout VIL file: ``id`` (N,) bytes and ``vil`` (N, 16, 16, 49) uint8; with ``pad``
    an extra dataset of that many random bytes (a larger object, still a valid file)."""
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    with h5py.File(buf, "w") as f:
        f.create_dataset("id", data=np.array([i.encode() for i in ids]))
        f.create_dataset("vil", data=rng.integers(0, 256, (len(ids), SIDE, SIDE, FRAMES), dtype=np.uint8))
        if pad:
            f.create_dataset("pad", data=rng.integers(0, 256, pad, dtype=np.uint8))
    return buf.getvalue()


def catalog_row(
    event_id: str,
    file_name: str,
    index: int,
    time_utc: str,
    event_type: str,
    img_type: str = "vil",
    pct_missing: str = "0",
) -> dict[str, Any]:
    storm = event_id.startswith("S")
    return {
        "id": event_id, "file_name": file_name, "file_index": index, "img_type": img_type,
        "time_utc": time_utc, "minute_offsets": ":".join(str(m) for m in range(-120, 125, 5)),
        "episode_id": 100 + index if storm else "", "event_id": 1000 + index if storm else "",
        "event_type": event_type, "llcrnrlat": 33.21, "llcrnrlon": -101.5, "urcrnrlat": 36.6,
        "urcrnrlon": -97.1, "proj": PROJ, "size_x": SIDE, "size_y": SIDE, "height_m": 384000.0,
        "width_m": 384000.0, "data_min": 0, "data_max": 254.0, "pct_missing": pct_missing,
    }  # fmt: skip


def catalog_csv(extra_rows: Sequence[dict[str, Any]] = ()) -> bytes:
    """CATALOG.csv for EVENTS plus non-VIL rows, a VIL row with missing data and a duplicated id."""
    rows = [catalog_row(*event) for event in EVENTS]
    rows += [
        catalog_row("S3", IR_2019A, 0, "2019-03-01 15:00:00", "Hail", img_type="ir069"),  # not VIL
        catalog_row("S5", IR_2019B, 0, "2019-07-03 20:00:00", "Hail", img_type="ir069"),  # not VIL
        catalog_row("S9", FILE_2019A, 2, "2019-05-05 05:00:00", "Hail", pct_missing="0.25"),  # missing data
        catalog_row("S4", FILE_2019B, 2, "2019-04-02 21:05:00", "Thunderstorm Wind"),  # duplicate id
        *extra_rows,
    ]
    return pd.DataFrame(rows, columns=CATALOG_COLUMNS).to_csv(index=False).encode()


@pytest.fixture(scope="session")
def sevir_objects() -> dict[str, bytes]:
    """Bucket key -> content of the synthetic SEVIR bucket."""
    objects = {"CATALOG.csv": catalog_csv()}
    for seed, name in enumerate(VIL_FILES):
        objects[f"data/{name}"] = vil_h5([e[0] for e in EVENTS if e[1] == name], seed)
    return objects


# ------------------------------------------------------------------------------ the S3 server
@pytest.fixture(scope="session")
def moto_url() -> Iterator[str]:
    """A moto S3 server on a free loopback port, for the whole session."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no access log on stderr
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture(autouse=True)
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Fake credentials, no real ~/.aws files, no HTTP proxy from the environment."""
    for var in (
        "AWS_PROFILE",
        "AWS_ENDPOINT_URL",
        "AWS_ENDPOINT_URL_S3",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "http_proxy",
        "https_proxy",
    ):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


class Bucket:
    """The test bucket on the moto server, written with a signed (admin) client.

    Like the real SEVIR bucket, objects carry no flexible checksum (CRC) unless asked
    for, so the ETag is the only content check a download gets.
    """

    def __init__(self, url: str):
        config = BotoConfig(request_checksum_calculation="when_required")
        self.admin = boto3.client("s3", endpoint_url=url, region_name="us-east-1", config=config)

    def put(self, key: str, body: bytes, public: bool = True, crc: bool = False) -> None:
        extra: dict[str, Any] = {"ACL": "public-read"} if public else {}
        if crc:
            extra["ChecksumAlgorithm"] = "CRC32"
        self.admin.put_object(Bucket=BUCKET, Key=key, Body=body, **extra)

    def put_multipart(self, key: str, body: bytes, part_size: int) -> str:
        """Upload ``body`` in parts of ``part_size`` bytes; return the object's ETag."""
        upload = self.admin.create_multipart_upload(Bucket=BUCKET, Key=key, ACL="public-read")["UploadId"]
        parts = []
        for number, start in enumerate(range(0, len(body), part_size), 1):
            etag = self.admin.upload_part(
                Bucket=BUCKET, Key=key, UploadId=upload, PartNumber=number, Body=body[start : start + part_size]
            )["ETag"]
            parts.append({"PartNumber": number, "ETag": etag})
        self.admin.complete_multipart_upload(Bucket=BUCKET, Key=key, UploadId=upload, MultipartUpload={"Parts": parts})
        return self.admin.head_object(Bucket=BUCKET, Key=key)["ETag"].strip('"')

    def delete(self, key: str) -> None:
        self.admin.delete_object(Bucket=BUCKET, Key=key)


@pytest.fixture
def bucket(moto_url: str, sevir_objects: dict[str, bytes]) -> Bucket:
    """A fresh public 'sevir' bucket holding the synthetic SEVIR objects."""
    urllib.request.urlopen(urllib.request.Request(f"{moto_url}/moto-api/reset", method="POST"), timeout=10).close()
    b = Bucket(moto_url)
    b.admin.create_bucket(Bucket=BUCKET)
    for key, body in sevir_objects.items():
        b.put(key, body)
    return b


# ----------------------------------------------------------------------------- the fault proxy
@dataclass
class Fault:
    """What to do to the next ``times`` matching requests (-1: all of them)."""

    key: str  # bucket key the request is for
    kind: str  # "status": answer `status` | "cut": close after `after` body bytes | "stall": hang after `after`
    # | "corrupt": flip a byte | "ignore-range": drop the Range header (the server answers the whole object)
    method: str = "GET"
    times: int = 1
    status: int = 503
    after: int = 0
    skip: int = 0  # let this many matching requests through untouched first
    range_from: int | None = None  # match only requests whose Range starts at this byte


@dataclass
class Seen:
    method: str
    key: str
    range: str | None
    status: int
    sent: int = 0  # body bytes actually sent to the client


@dataclass
class FaultProxy:
    """HTTP proxy on 127.0.0.1 in front of moto: logs every request and injects :class:`Fault`s."""

    upstream: str
    faults: list[Fault] = field(default_factory=list)
    seen: list[Seen] = field(default_factory=list)
    stalled: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)  # requests arrive on several threads

    def start(self) -> None:
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def stop(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def gets(self, key: str | None = None) -> list[Seen]:
        return [s for s in self.seen if s.method == "GET" and (key is None or s.key == key)]

    def take_fault(self, method: str, key: str, range_header: str | None = None) -> Fault | None:
        with self.lock:
            for fault in self.faults:
                if fault.range_from is not None and not (range_header or "").startswith(f"bytes={fault.range_from}-"):
                    continue
                if fault.method == method and fault.key == key and fault.times != 0:
                    if fault.skip:
                        fault.skip -= 1
                        return None
                    fault.times -= 1
                    return fault
        return None


_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "proxy-connection", "te", "upgrade"}


def _handler_for(proxy: FaultProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            self.forward()

        def do_HEAD(self) -> None:
            self.forward()

        def forward(self) -> None:
            path = urllib.parse.urlsplit(self.path).path
            key = urllib.parse.unquote(path).removeprefix(f"/{BUCKET}/")
            seen = Seen(self.command, key, self.headers.get("Range"), 0)
            proxy.seen.append(seen)
            fault = proxy.take_fault(self.command, key, self.headers.get("Range"))
            if fault is not None and fault.kind == "status":
                seen.status = fault.status
                return self.answer_error(fault.status)
            status, headers, body = self.ask_upstream(drop_range=fault is not None and fault.kind == "ignore-range")
            seen.status = status
            if fault is not None and fault.kind == "corrupt" and body:
                body = bytes([body[0] ^ 0xFF]) + body[1:]
            self.send_response(status)
            for name, value in headers:
                if name.lower() not in _HOP_BY_HOP:
                    self.send_header(name, value)
            upstream_length = next((v for k, v in headers if k.lower() == "content-length"), "0")
            self.send_header("Content-Length", upstream_length if self.command == "HEAD" else str(len(body)))
            self.end_headers()
            if self.command == "HEAD":
                return
            if fault is not None and fault.kind in ("cut", "stall"):
                self.wfile.write(body[: fault.after])
                seen.sent = fault.after
                if fault.kind == "stall":
                    proxy.stalled.set()
                    proxy.release.wait(30)
                self.close_connection = True
                return
            self.wfile.write(body)
            seen.sent = len(body)

        def ask_upstream(self, drop_range: bool) -> tuple[int, list[tuple[str, str]], bytes]:
            host, port = urllib.parse.urlsplit(proxy.upstream).netloc.split(":")
            conn = http.client.HTTPConnection(host, int(port), timeout=10)
            dropped = _HOP_BY_HOP | ({"range"} if drop_range else set())
            try:
                headers = {k: v for k, v in self.headers.items() if k.lower() not in dropped}
                conn.request(self.command, self.path, headers=headers)
                response = conn.getresponse()
                return response.status, response.getheaders(), response.read()
            finally:
                conn.close()

        def answer_error(self, status: int) -> None:
            body = b"" if self.command == "HEAD" else (
                b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>ServiceUnavailable</Code>'
                b"<Message>Injected by the test proxy</Message></Error>"
            )  # fmt: skip
            self.send_response(status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return Handler


@pytest.fixture
def proxy(moto_url: str, bucket: Bucket) -> Iterator[FaultProxy]:
    p = FaultProxy(moto_url)
    p.start()
    yield p
    p.stop()


def source(proxy: FaultProxy, **overrides: Any) -> S3Source:
    """An S3Source reading the test bucket through the proxy: all years, no caps, fast retries."""
    values: dict[str, Any] = {
        "bucket": BUCKET, "endpoint_url": proxy.url, "years": [2018, 2019], "event_types": [],
        "max_files": 0, "max_events": 0, "retries": 3, "backoff_s": 0.001, "part_size_mb": 8,
    }  # fmt: skip
    return S3Source(**(values | overrides))


def data_files(root: Path) -> set[str]:
    """Every regular file under ``root`` except the fetch's own state, relative, '/'-separated."""
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and s3.STATE_DIR not in p.parts}


def catalog_text(root: Path) -> pd.DataFrame:
    return pd.read_csv(root / "CATALOG.csv", dtype=str, keep_default_na=False)


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def begin_partial(root: Path, name: str, content: bytes, etag: str, size: int) -> Path:
    """Leave what a killed fetch leaves: ``<file>.part`` plus its ``.part.json`` record."""
    part = root / f"{name}.part"
    part.parent.mkdir(parents=True, exist_ok=True)
    part.write_bytes(content)
    Path(f"{part}.json").write_text(json.dumps({"key": f"data/{name}", "size": size, "etag": etag}))
    return part


# ------------------------------------------------------------------------------------ selection
def test_selects_years_and_event_types(tmp_path: Path, proxy: FaultProxy, sevir_objects: dict[str, bytes]) -> None:
    root = tmp_path / "raw"
    catalog = s3.fetch_s3(root, source(proxy, years=[2019], event_types=["hail"]), progress=False)

    assert data_files(root) == {"CATALOG.csv", FILE_2019A, FILE_2019B}
    for name in (FILE_2019A, FILE_2019B):
        assert (root / name).read_bytes() == sevir_objects[f"data/{name}"]
    assert {s.key for s in proxy.gets()} == {"CATALOG.csv", f"data/{FILE_2019A}", f"data/{FILE_2019B}"}
    written = catalog_text(root)
    assert list(written.columns) == CATALOG_COLUMNS
    assert written["id"].tolist() == ["S3", "S5"]  # VIL rows only, no ir069 row of the same events
    bucket_rows = pd.read_csv(io.BytesIO(sevir_objects["CATALOG.csv"]), dtype=str, keep_default_na=False)
    expected = bucket_rows[(bucket_rows["img_type"] == "vil") & bucket_rows["id"].isin(["S3", "S5"])].reset_index(
        drop=True
    )
    pd.testing.assert_frame_equal(written, expected)  # every value as in the bucket
    pd.testing.assert_frame_equal(catalog, read_catalog(root))


def test_drops_missing_data_and_duplicate_ids(tmp_path: Path, proxy: FaultProxy) -> None:
    root = tmp_path / "raw"
    s3.fetch_s3(root, source(proxy, years=[2019]), progress=False)
    written = catalog_text(root)
    assert sorted(written["id"]) == ["R1", "R2", "S3", "S4", "S5", "S6"]
    assert written.loc[written["id"] == "S4", "file_name"].tolist() == [FILE_2019A]  # first of the duplicates
    assert set(written["img_type"]) == {"vil"}


@pytest.mark.parametrize(
    ("caps", "files", "ids"),
    [
        ({"max_events": 2}, {FILE_RANDOM, FILE_2019A}, ["S3", "R1"]),  # the 2 earliest 2019 events
        ({"max_files": 1}, {FILE_RANDOM}, ["R1", "R2"]),  # the file of the earliest event, all its events
        ({"max_events": 2, "max_files": 1}, {FILE_RANDOM}, ["R1"]),  # events capped first, then files
        ({"max_events": 3, "max_files": 2}, {FILE_RANDOM, FILE_2019A}, ["S3", "S4", "R1"]),
    ],
)
def test_caps_on_events_and_files(
    tmp_path: Path, proxy: FaultProxy, caps: dict[str, int], files: set[str], ids: list[str]
) -> None:
    root = tmp_path / "raw"
    s3.fetch_s3(root, source(proxy, years=[2019], **caps), progress=False)
    assert data_files(root) == {"CATALOG.csv", *files}
    assert catalog_text(root)["id"].tolist() == ids  # catalog order
    assert {s.key for s in proxy.gets()} == {"CATALOG.csv", *(f"data/{f}" for f in files)}


def test_no_matching_event_is_one_clear_error(tmp_path: Path, proxy: FaultProxy) -> None:
    with pytest.raises(DataError, match=r"no VIL events match data.s3.years \[2017\].*VIL years \[2018, 2019\]"):
        s3.fetch_s3(tmp_path / "raw", source(proxy, years=[2017]), progress=False)
    assert not (tmp_path / "raw" / "CATALOG.csv").exists()


def test_unknown_event_type_is_warned(tmp_path: Path, proxy: FaultProxy, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="pipeline.fetch"):
        s3.fetch_s3(tmp_path / "raw", source(proxy, years=[2018], event_types=["Hail", "Hurricane"]), progress=False)
    assert "'Hurricane' matches no VIL event" in caplog.text
    assert catalog_text(tmp_path / "raw")["id"].tolist() == ["S1"]


# ------------------------------------------------------------------------- finished files, resume
def test_second_run_downloads_nothing(tmp_path: Path, proxy: FaultProxy, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "raw"
    cfg = source(proxy)
    s3.fetch_s3(root, cfg, progress=False)
    mtimes = {p: p.stat().st_mtime_ns for p in root.rglob("*.h5")}
    assert len(mtimes) == 4
    proxy.seen.clear()
    with caplog.at_level(logging.INFO, logger="pipeline.fetch"):
        s3.fetch_s3(root, cfg, progress=False)
    assert proxy.gets() == []  # HEADs only
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*.h5")} == mtimes
    assert "already downloaded" in caplog.text

    (root / s3.STATE_DIR / s3.MANIFEST_NAME).unlink()  # no record: a size match with head_object suffices
    s3.fetch_s3(root, cfg, progress=False)
    assert proxy.gets() == []


def test_changed_object_is_downloaded_again(
    tmp_path: Path, proxy: FaultProxy, bucket: Bucket, sevir_objects: dict[str, bytes]
) -> None:
    root = tmp_path / "raw"
    cfg = source(proxy, years=[2018])
    s3.fetch_s3(root, cfg, progress=False)
    new = vil_h5(["S1", "S2"], seed=99)  # same layout and size, other bytes
    assert len(new) == len(sevir_objects[f"data/{FILE_2018}"]) and new != sevir_objects[f"data/{FILE_2018}"]
    bucket.put(f"data/{FILE_2018}", new)
    proxy.seen.clear()
    s3.fetch_s3(root, cfg, progress=False)
    assert [s.key for s in proxy.gets()] == [f"data/{FILE_2018}"]
    assert (root / FILE_2018).read_bytes() == new


def test_resume_requests_only_the_missing_range(
    tmp_path: Path, proxy: FaultProxy, sevir_objects: dict[str, bytes]
) -> None:
    root = tmp_path / "raw"
    content = sevir_objects[f"data/{FILE_2018}"]
    begin_partial(root, FILE_2018, content[:10_000], md5(content), len(content))

    s3.fetch_s3(root, source(proxy, years=[2018]), progress=False)

    [get] = proxy.gets(f"data/{FILE_2018}")
    assert get.range == "bytes=10000-"
    assert get.sent == len(content) - 10_000
    assert (root / FILE_2018).read_bytes() == content
    assert not (root / f"{FILE_2018}.part").exists() and not (root / f"{FILE_2018}.part.json").exists()


def test_server_ignoring_range_restarts_the_file(
    tmp_path: Path, proxy: FaultProxy, sevir_objects: dict[str, bytes], caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "raw"
    content = sevir_objects[f"data/{FILE_2018}"]
    begin_partial(root, FILE_2018, content[:10_000], md5(content), len(content))
    proxy.faults.append(Fault(f"data/{FILE_2018}", "ignore-range"))

    with caplog.at_level(logging.WARNING, logger="pipeline.fetch"):
        s3.fetch_s3(root, source(proxy, years=[2018]), progress=False)

    [get] = proxy.gets(f"data/{FILE_2018}")
    assert (get.range, get.status, get.sent) == ("bytes=10000-", 200, len(content))
    assert "server ignored the Range request" in caplog.text
    assert (root / FILE_2018).read_bytes() == content


def test_partial_of_another_object_version_starts_over(
    tmp_path: Path, proxy: FaultProxy, sevir_objects: dict[str, bytes]
) -> None:
    root = tmp_path / "raw"
    content = sevir_objects[f"data/{FILE_2018}"]
    old = bytes(reversed(content))
    begin_partial(root, FILE_2018, old[:10_000], md5(old), len(old))

    s3.fetch_s3(root, source(proxy, years=[2018]), progress=False)

    [get] = proxy.gets(f"data/{FILE_2018}")
    assert get.range is None and get.sent == len(content)
    assert (root / FILE_2018).read_bytes() == content


KILLED_FETCH = """
import json, sys
from pathlib import Path
import pipeline.sevir.s3 as s3
from pipeline.config import S3Source
s3.CHUNK_BYTES = 4096  # small reads, so bytes reach the .part file before the stall
s3.fetch_s3(Path(sys.argv[1]), S3Source(**json.loads(sys.argv[2])), progress=False)
"""


def test_killed_fetch_resumes_where_it_stopped(
    tmp_path: Path, proxy: FaultProxy, sevir_objects: dict[str, bytes]
) -> None:
    root = tmp_path / "raw"
    key, part = f"data/{FILE_2018}", root / f"{FILE_2018}.part"
    content = sevir_objects[key]
    cfg = source(proxy, years=[2018])
    proxy.faults.append(Fault(key, "stall", after=10_000))
    env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_FETCH, str(root), cfg.model_dump_json()],
        cwd=REPO,
        env=env,
        stderr=subprocess.PIPE,
    )
    try:
        assert proxy.stalled.wait(30), (
            proc.stderr.read().decode() if proc.poll() is not None else "fetch never reached the file"
        )
        deadline = time.monotonic() + 10
        while (part.stat().st_size if part.exists() else 0) < 8192 and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        proc.kill()
        proc.wait()
        proxy.release.set()
    have = part.stat().st_size
    assert 8192 <= have < len(content)
    assert not (root / FILE_2018).exists() and not (root / "CATALOG.csv").exists()
    proxy.seen.clear()

    s3.fetch_s3(root, cfg, progress=False)

    assert [(s.key, s.range, s.sent) for s in proxy.gets()] == [(key, f"bytes={have}-", len(content) - have)]
    assert (root / FILE_2018).read_bytes() == content
    assert catalog_text(root)["id"].tolist() == ["S1", "S2"]


# ------------------------------------------------------------------------------- verification
def test_corrupt_partial_is_detected_and_downloaded_again(
    tmp_path: Path, proxy: FaultProxy, sevir_objects: dict[str, bytes], caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "raw"
    content = sevir_objects[f"data/{FILE_2018}"]
    begin_partial(root, FILE_2018, bytes(10_000), md5(content), len(content))  # right record, wrong bytes

    with caplog.at_level(logging.WARNING, logger="pipeline.fetch"):
        s3.fetch_s3(root, source(proxy, years=[2018]), progress=False)

    assert [s.range for s in proxy.gets(f"data/{FILE_2018}")] == ["bytes=10000-", None]
    assert "failed verification" in caplog.text and "from scratch" in caplog.text
    assert (root / FILE_2018).read_bytes() == content


@pytest.mark.parametrize("crc", [False, True], ids=["etag-md5", "crc32-checksum"])
def test_data_corrupted_in_transit_is_an_error_and_leaves_nothing(
    tmp_path: Path, proxy: FaultProxy, bucket: Bucket, sevir_objects: dict[str, bytes], crc: bool
) -> None:
    root = tmp_path / "raw"
    key = f"data/{FILE_2018}"
    if crc:  # an object with a stored CRC32: botocore checks whole-object GETs against it
        bucket.put(key, sevir_objects[key], crc=True)
    proxy.faults.append(Fault(key, "corrupt", times=-1))

    check = "checksum" if crc else "MD5 [0-9a-f]{32} does not match the ETag"
    with pytest.raises(DataError, match=rf"s3://sevir/{key}: downloaded data failed verification twice \(.*{check}"):
        s3.fetch_s3(root, source(proxy, years=[2018]), progress=False)

    assert len(proxy.gets(key)) == 2  # once more from scratch, then give up
    assert not (root / FILE_2018).exists()
    assert not (root / f"{FILE_2018}.part").exists() and not (root / f"{FILE_2018}.part.json").exists()
    assert not (root / "CATALOG.csv").exists()


def test_multipart_etag_is_verified(
    tmp_path: Path, proxy: FaultProxy, bucket: Bucket, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import moto.s3.models

    monkeypatch.setattr(moto.s3.models, "S3_UPLOAD_PART_MIN_SIZE", 1024)  # the server runs in this process
    body = vil_h5(["S1", "S2"], seed=7, pad=5 * s3.MiB // 2)  # a valid VIL file of ~2.5 MiB
    etag = bucket.put_multipart(f"data/{FILE_2018}", body, part_size=s3.MiB)
    assert etag.endswith("-3")

    root = tmp_path / "raw"
    real_etags = s3.multipart_etags
    _forbid_reread(monkeypatch)  # the part MD5s are computed while the bytes stream in
    with caplog.at_level(logging.DEBUG, logger="pipeline.fetch"):
        s3.fetch_s3(root, source(proxy, years=[2018], part_size_mb=1), progress=False)
    monkeypatch.setattr(s3, "multipart_etags", real_etags)
    manifest = json.loads((root / s3.STATE_DIR / s3.MANIFEST_NAME).read_text())
    assert manifest[FILE_2018]["verified"] == "multipart MD5 (1.0 MiB parts)"
    assert (root / FILE_2018).read_bytes() == body

    # A part size that is neither data.s3.part_size_mb nor 8 MiB: accepted on size, said at debug level.
    root2 = tmp_path / "raw2"
    with caplog.at_level(logging.DEBUG, logger="pipeline.fetch"):
        s3.fetch_s3(root2, source(proxy, years=[2018], part_size_mb=2), progress=False)
    assert json.loads((root2 / s3.STATE_DIR / s3.MANIFEST_NAME).read_text())[FILE_2018]["verified"] == "size"
    assert "verified by size only" in caplog.text


def test_multipart_etag_matches_s3(tmp_path: Path, bucket: Bucket, monkeypatch: pytest.MonkeyPatch) -> None:
    import moto.s3.models

    monkeypatch.setattr(moto.s3.models, "S3_UPLOAD_PART_MIN_SIZE", 1024)
    body = np.random.default_rng(3).integers(0, 256, 25_000, dtype=np.uint8).tobytes()
    path = tmp_path / "blob"
    path.write_bytes(body)
    etag = bucket.put_multipart("blob", body, part_size=10_000)
    assert s3.multipart_etags(path, [10_000, 8_000]) == {10_000: etag, 8_000: s3.multipart_etags(path, [8_000])[8_000]}
    assert s3.verify_file(path, len(body), etag, [8_000, 10_000]) == "multipart MD5 (9.8 KiB parts)"
    with pytest.raises(s3.ChecksumMismatch, match="expected 25001"):
        s3.verify_file(path, len(body) + 1, etag, [10_000])
    with pytest.raises(s3.ChecksumMismatch, match="does not match the ETag"):
        s3.verify_file(path, len(body), md5(body[::-1]), [10_000])


# ------------------------------------------------------------------------------------- retries
@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Backoff delays the fetch asked for (without waiting them)."""
    delays: list[float] = []
    monkeypatch.setattr(s3.time, "sleep", delays.append)
    return delays


def test_5xx_is_retried_with_backoff(
    tmp_path: Path, proxy: FaultProxy, sevir_objects: dict[str, bytes], sleeps: list[float]
) -> None:
    key = f"data/{FILE_2018}"
    proxy.faults += [
        Fault("CATALOG.csv", "status", method="HEAD", status=500),
        Fault(key, "status", status=503, times=2),
    ]

    s3.fetch_s3(tmp_path / "raw", source(proxy, years=[2018], backoff_s=0.5), progress=False)

    assert [s.status for s in proxy.gets(key)] == [503, 503, 200]
    assert sleeps == [0.5, 0.5, 1.0]  # HEAD retry 1, then GET retries 1 and 2
    assert (tmp_path / "raw" / FILE_2018).read_bytes() == sevir_objects[key]


def test_cut_stream_is_resumed_from_the_bytes_kept(
    tmp_path: Path,
    proxy: FaultProxy,
    sevir_objects: dict[str, bytes],
    monkeypatch: pytest.MonkeyPatch,
    sleeps: list[float],
) -> None:
    monkeypatch.setattr(s3, "CHUNK_BYTES", 4096)
    key = f"data/{FILE_2018}"
    content = sevir_objects[key]
    proxy.faults.append(Fault(key, "cut", after=10_000))

    s3.fetch_s3(tmp_path / "raw", source(proxy, years=[2018]), progress=False)

    first, second = proxy.gets(key)
    assert (first.range, first.sent) == (None, 10_000)
    kept = int(second.range.removeprefix("bytes=").removesuffix("-"))
    assert 8192 <= kept <= 10_000  # at least the two whole 4 KiB reads before the cut
    assert second.sent == len(content) - kept
    assert (tmp_path / "raw" / FILE_2018).read_bytes() == content
    assert len(sleeps) == 1


def test_retries_used_up_is_one_clear_error(tmp_path: Path, proxy: FaultProxy, sleeps: list[float]) -> None:
    key = f"data/{FILE_2018}"
    proxy.faults.append(Fault(key, "status", status=503, times=-1))
    with pytest.raises(
        DataError, match=rf"s3://sevir/{key}: giving up after 3 failed attempt\(s\) \(HTTP 503 ServiceUnavailable\)"
    ):
        s3.fetch_s3(tmp_path / "raw", source(proxy, years=[2018], retries=2, backoff_s=1.0), progress=False)
    assert sleeps == [1.0, 2.0]
    assert not (tmp_path / "raw" / FILE_2018).exists()


def test_unreachable_endpoint_is_one_clear_error(tmp_path: Path, sleeps: list[float]) -> None:
    with socket.socket() as sock:  # a loopback port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cfg = S3Source(endpoint_url=f"http://127.0.0.1:{port}", retries=1, backoff_s=0.01)
    with pytest.raises(
        DataError,
        match=r"s3://sevir/CATALOG.csv: giving up after 2 failed attempt\(s\) \(EndpointConnectionError.*endpoint_url",
    ):
        s3.fetch_s3(tmp_path / "raw", cfg, progress=False)


# --------------------------------------------------------------------------------- client errors
def test_missing_file_is_404_naming_the_key(tmp_path: Path, proxy: FaultProxy, bucket: Bucket) -> None:
    bucket.delete(f"data/{FILE_2019B}")
    expected = rf"^s3://sevir/data/{FILE_2019B}: not found \(404\); check data.s3.bucket/data_prefix"
    with pytest.raises(DataError, match=expected):
        s3.fetch_s3(tmp_path / "raw", source(proxy), progress=False)
    assert [s.key for s in proxy.gets()] == ["CATALOG.csv"]  # every file is checked before any download
    assert data_files(tmp_path / "raw") == set()


def test_missing_catalog_is_404(tmp_path: Path, proxy: FaultProxy) -> None:
    with pytest.raises(
        DataError, match=r"^s3://sevir/CATALOG\.csv\.gz: not found \(404\); check data.s3.bucket, data.s3.catalog_key"
    ):
        s3.fetch_s3(tmp_path / "raw", source(proxy, catalog_key="CATALOG.csv.gz"), progress=False)


def test_private_object_is_403(
    tmp_path: Path, proxy: FaultProxy, bucket: Bucket, sevir_objects: dict[str, bytes]
) -> None:
    bucket.put(f"data/{FILE_2018}", sevir_objects[f"data/{FILE_2018}"], public=False)
    with pytest.raises(DataError, match=rf"s3://sevir/data/{FILE_2018}: access denied \(403\); requests are unsigned"):
        s3.fetch_s3(tmp_path / "raw", source(proxy, years=[2018]), progress=False)


@pytest.mark.parametrize("bad_name", ["../../outside.h5", "vil/../../outside.h5", "/tmp/outside.h5"])
def test_path_traversal_in_catalog_is_refused(tmp_path: Path, proxy: FaultProxy, bucket: Bucket, bad_name: str) -> None:
    bucket.put("CATALOG.csv", catalog_csv([catalog_row("S7", bad_name, 0, "2019-10-01 00:00:00", "Hail")]))
    root = tmp_path / "a" / "raw"
    with pytest.raises(DataError, match="file_name .*(escapes|not a relative path)"):
        s3.fetch_s3(root, source(proxy), progress=False)
    assert [s.key for s in proxy.gets()] == ["CATALOG.csv"]  # refused before any file request
    assert data_files(root) == set()
    assert sorted(p.name for p in tmp_path.rglob("*outside*")) == []


# ------------------------------------------------------------------------------ client and bars
def test_progress_bar_shows_bytes_and_rate(
    tmp_path: Path, proxy: FaultProxy, capfd: pytest.CaptureFixture[str]
) -> None:
    s3.fetch_s3(tmp_path / "raw", source(proxy, years=[2018]), progress=True)
    err = capfd.readouterr().err
    assert "B/s" in err and os.path.basename(FILE_2018)[:20] in err


def test_make_client_is_unsigned_and_leaves_retries_to_the_fetch(proxy: FaultProxy) -> None:
    from botocore import UNSIGNED

    client = s3.make_client(source(proxy))
    assert client.meta.config.signature_version is UNSIGNED
    assert client.meta.config.retries["total_max_attempts"] == 1
    assert client.meta.endpoint_url == proxy.url


def test_pointer_left_by_a_local_source_is_removed(tmp_path: Path, proxy: FaultProxy) -> None:
    root = tmp_path / "raw"
    root.mkdir()
    (root / SOURCE_ROOT_NAME).write_text(f"{tmp_path / 'elsewhere'}\n")
    s3.fetch_s3(root, source(proxy, years=[2018]), progress=False)
    assert data_root_of(root) == root  # file names resolve against the downloaded files


# ---------------------------------------------------------------------------------- concurrency
def _forbid_reread(monkeypatch: pytest.MonkeyPatch) -> None:
    def reread(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a downloaded file was read again to hash it")

    monkeypatch.setattr(s3, "file_md5", reread)
    monkeypatch.setattr(s3, "multipart_etags", reread)


def test_files_download_concurrently_and_one_stall_does_not_hold_the_others(
    tmp_path: Path, proxy: FaultProxy, sevir_objects: dict[str, bytes], sleeps: list[float]
) -> None:
    root = tmp_path / "raw"
    stalled = f"data/{FILE_2018}"
    proxy.faults.append(Fault(stalled, "stall", after=5_000))
    others = [name for name in VIL_FILES if name != FILE_2018]
    done = threading.Event()

    def release_when_the_others_are_done() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not all((root / name).exists() for name in others):
            time.sleep(0.02)
        done.set()
        proxy.release.set()

    assert proxy.stalled is not None
    watcher = threading.Thread(target=release_when_the_others_are_done)
    watcher.start()
    s3.fetch_s3(root, source(proxy, concurrency=4), progress=False)
    watcher.join()
    assert done.is_set() and all((root / name).exists() for name in others)
    _assert_every_file_fetched_and_md5_verified(root, sevir_objects)
    gets = proxy.gets(stalled)
    assert [g.range for g in gets][0] is None and gets[-1].range is not None  # the stalled stream was resumed


def test_concurrent_download_hashes_while_streaming(
    tmp_path: Path, proxy: FaultProxy, sevir_objects: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    _forbid_reread(monkeypatch)
    root = tmp_path / "raw"
    s3.fetch_s3(root, source(proxy, concurrency=3), progress=False)
    _assert_every_file_fetched_and_md5_verified(root, sevir_objects)


def _assert_every_file_fetched_and_md5_verified(root: Path, sevir_objects: dict[str, bytes]) -> None:
    for name in VIL_FILES:
        assert (root / name).read_bytes() == sevir_objects[f"data/{name}"]
    manifest = json.loads((root / s3.STATE_DIR / s3.MANIFEST_NAME).read_text())
    assert {manifest[name]["verified"] for name in VIL_FILES} == {"MD5"}


def test_a_resumed_download_hashes_the_kept_part_and_streams_the_rest(
    tmp_path: Path, proxy: FaultProxy, sevir_objects: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    _forbid_reread(monkeypatch)
    root = tmp_path / "raw"
    content = sevir_objects[f"data/{FILE_2018}"]
    begin_partial(root, FILE_2018, content[:10_000], md5(content), len(content))
    s3.fetch_s3(root, source(proxy, years=[2018]), progress=False)
    assert [g.range for g in proxy.gets(f"data/{FILE_2018}")] == ["bytes=10000-"]
    assert (root / FILE_2018).read_bytes() == content


def test_corruption_with_concurrency_fails_that_file_and_keeps_the_rest(
    tmp_path: Path, proxy: FaultProxy, sevir_objects: dict[str, bytes]
) -> None:
    root = tmp_path / "raw"
    key = f"data/{FILE_2019B}"
    proxy.faults.append(Fault(key, "corrupt", times=-1))
    with pytest.raises(DataError, match=rf"s3://sevir/{key}: downloaded data failed verification twice"):
        s3.fetch_s3(root, source(proxy, concurrency=4), progress=False)
    assert len(proxy.gets(key)) == 2
    assert not (root / FILE_2019B).exists() and not (root / f"{FILE_2019B}.part").exists()
    assert not (root / "CATALOG.csv").exists()
    for name in VIL_FILES:  # every other file is finished and verified, or a resumable partial
        if name != FILE_2019B and (root / name).exists():
            assert (root / name).read_bytes() == sevir_objects[f"data/{name}"]

    proxy.faults.clear()
    finished = {name for name in VIL_FILES if (root / name).exists()}
    proxy.seen.clear()
    s3.fetch_s3(root, source(proxy, concurrency=4), progress=False)
    assert {g.key for g in proxy.gets()} == {f"data/{n}" for n in set(VIL_FILES) - finished}  # catalog cached
    for name in VIL_FILES:
        assert (root / name).read_bytes() == sevir_objects[f"data/{name}"]


KILLED_CONCURRENT_FETCH = """
import json, sys
from pathlib import Path
import pipeline.sevir.s3 as s3
from pipeline.config import S3Source
s3.CHUNK_BYTES = 4096
s3.fetch_s3(Path(sys.argv[1]), S3Source(**json.loads(sys.argv[2])), progress=False)
"""


def test_killed_concurrent_fetch_resumes_only_what_is_missing(
    tmp_path: Path, proxy: FaultProxy, sevir_objects: dict[str, bytes]
) -> None:
    """kill -9 while four files download at once, one of them stalled mid-way: the next run
    requests only the stalled file's missing bytes, and every file ends up verified."""
    root = tmp_path / "raw"
    key, part = f"data/{FILE_2018}", root / f"{FILE_2018}.part"
    cfg = source(proxy, concurrency=4)
    proxy.faults.append(Fault(key, "stall", after=10_000))
    others = [name for name in VIL_FILES if name != FILE_2018]
    env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen([sys.executable, "-c", KILLED_CONCURRENT_FETCH, str(root), cfg.model_dump_json()],
                            cwd=REPO, env=env, stderr=subprocess.PIPE)  # fmt: skip
    try:
        assert proxy.stalled.wait(30), proc.stderr.read().decode() if proc.poll() is not None else "no stall"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (
            all((root / n).exists() for n in others) and part.exists() and part.stat().st_size >= 8192
        ):
            time.sleep(0.02)
    finally:
        proc.kill()  # SIGKILL: no cleanup runs
        proc.wait()
        proxy.release.set()
    have = part.stat().st_size
    assert 8192 <= have < len(sevir_objects[key]) and all((root / n).exists() for n in others)
    assert not (root / "CATALOG.csv").exists()
    proxy.seen.clear()

    s3.fetch_s3(root, cfg, progress=False)

    assert [(s.key, s.range) for s in proxy.gets()] == [(key, f"bytes={have}-")]
    for name in VIL_FILES:
        assert (root / name).read_bytes() == sevir_objects[f"data/{name}"]
    assert sorted(catalog_text(root)["id"]) == ["R1", "R2", "S1", "S2", "S3", "S4", "S5", "S6"]


# ------------------------------------------------------------------- ranged parts of one file
PART = 4096  # RANGE_PART_BYTES in these tests: the ~27 KB test files come in 7 parts


@pytest.fixture
def small_parts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(s3, "RANGE_PART_BYTES", PART)
    monkeypatch.setattr(s3, "CHUNK_BYTES", 1024)


def _ranges(gets: list[Seen]) -> list[tuple[int, int]]:
    out = []
    for get in gets:
        assert get.range is not None and get.range.startswith("bytes=")
        a, b = get.range.removeprefix("bytes=").split("-")
        out.append((int(a), int(b) if b else -1))  # -1: to the end
    return sorted(out)


def test_one_file_is_fetched_in_ranged_parts_in_parallel(
    tmp_path: Path, proxy: FaultProxy, sevir_objects: dict[str, bytes], small_parts: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    _forbid_reread(monkeypatch)  # hashed in order as the parts are appended
    root, key = tmp_path / "raw", f"data/{FILE_2018}"
    content = sevir_objects[key]
    s3.fetch_s3(root, source(proxy, years=[2018], concurrency=4), progress=False)
    assert (root / FILE_2018).read_bytes() == content
    expected = [(a, min(a + PART, len(content)) - 1) for a in range(0, len(content), PART)]
    assert _ranges(proxy.gets(key)) == expected  # every part once, no overlap, nothing missing
    manifest = json.loads((root / s3.STATE_DIR / s3.MANIFEST_NAME).read_text())
    assert manifest[FILE_2018]["verified"] == "MD5"


def test_ranged_parts_are_retried_on_their_own(
    tmp_path: Path, proxy: FaultProxy, sevir_objects: dict[str, bytes], small_parts: None, sleeps: list[float]
) -> None:
    root, key = tmp_path / "raw", f"data/{FILE_2018}"
    proxy.faults += [Fault(key, "status", status=503, skip=2), Fault(key, "cut", after=1500, skip=4)]
    s3.fetch_s3(root, source(proxy, years=[2018], concurrency=4), progress=False)
    assert (root / FILE_2018).read_bytes() == sevir_objects[key]
    statuses = [g.status for g in proxy.gets(key)]
    assert statuses.count(503) == 1 and len(sleeps) == 2
    cut = next(g for g in proxy.gets(key) if g.sent == 1500)
    [(start, end)] = _ranges([cut])
    resumed = [r for r in _ranges(proxy.gets(key)) if r[1] == end and r[0] > start]
    assert [r[0] for r in resumed] in ([start + 1024], [start + 1500])  # within the part, from the bytes kept


def test_ranged_corruption_fails_verification_and_leaves_nothing(
    tmp_path: Path, proxy: FaultProxy, small_parts: None
) -> None:
    root, key = tmp_path / "raw", f"data/{FILE_2018}"
    proxy.faults.append(Fault(key, "corrupt", times=-1))
    with pytest.raises(DataError, match=rf"s3://sevir/{key}: downloaded data failed verification twice \(MD5"):
        s3.fetch_s3(root, source(proxy, years=[2018], concurrency=4), progress=False)
    assert not (root / FILE_2018).exists() and not (root / f"{FILE_2018}.part").exists()


def test_a_server_ignoring_ranges_falls_back_to_one_stream(
    tmp_path: Path, proxy: FaultProxy, sevir_objects: dict[str, bytes], small_parts: None,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    root, key = tmp_path / "raw", f"data/{FILE_2018}"
    proxy.faults.append(Fault(key, "ignore-range", times=-1))
    with caplog.at_level(logging.WARNING, logger="pipeline.fetch"):
        s3.fetch_s3(root, source(proxy, years=[2018], concurrency=4), progress=False)
    assert "going on with one stream" in caplog.text
    assert (root / FILE_2018).read_bytes() == sevir_objects[key]


KILLED_RANGED_FETCH = """
import json, sys
from pathlib import Path
import pipeline.sevir.s3 as s3
from pipeline.config import S3Source
s3.RANGE_PART_BYTES = 4096
s3.CHUNK_BYTES = 1024
s3.fetch_s3(Path(sys.argv[1]), S3Source(**json.loads(sys.argv[2])), progress=False)
"""


def test_killed_ranged_fetch_resumes_after_the_parts_on_disk(
    tmp_path: Path, proxy: FaultProxy, sevir_objects: dict[str, bytes]
) -> None:
    """kill -9 while one file comes in 4 parallel ranged parts, one part stalled: the partial file
    is the parts before it, in order; the next run fetches only the rest and verifies it."""
    root, key = tmp_path / "raw", f"data/{FILE_2018}"
    part, content = root / f"{FILE_2018}.part", sevir_objects[key]
    cfg = source(proxy, years=[2018], concurrency=4)
    proxy.faults.append(Fault(key, "stall", after=1000, range_from=3 * PART))  # the 4th part stalls
    env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen([sys.executable, "-c", KILLED_RANGED_FETCH, str(root), cfg.model_dump_json()],
                            cwd=REPO, env=env, stderr=subprocess.PIPE)  # fmt: skip
    try:
        assert proxy.stalled.wait(30), proc.stderr.read().decode() if proc.poll() is not None else "no stall"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (part.stat().st_size if part.exists() else 0) < 3 * PART:
            time.sleep(0.02)
    finally:
        proc.kill()
        proc.wait()
        proxy.release.set()
    have = part.stat().st_size
    assert have == 3 * PART < len(content)  # the parts before the stalled one, and nothing after it
    assert part.read_bytes() == content[:have]  # a prefix, in order
    proxy.seen.clear()

    s3.fetch_s3(root, cfg, progress=False)  # the default part size: the rest is one ranged stream or a few

    gets = proxy.gets(key)
    assert min(_ranges(gets))[0] == have and sum(g.sent for g in gets) == len(content) - have
    assert (root / FILE_2018).read_bytes() == content
