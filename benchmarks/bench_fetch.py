"""Stage fetch (S3): our fetcher, one stream and data.s3.concurrency at a time, against boto3's
TransferManager (``download_file``), on the same objects of a loopback S3 server, in one run.

    python benchmarks/bench_fetch.py [--files 6] [--events 4] [--size 384] [--concurrency 4] [--repeat 3]

Starts a moto S3 server in a child process on a free 127.0.0.1 port (as tests/test_fetch_s3.py
does, but out of this process, so serving does not compete for our GIL), uploads ``--files``
SEVIR-format VIL files (``--events`` events of size x size x 49 uint8 each, random bytes, single
part, so the ETag is the MD5) and a catalog, then times, each into an empty folder:

  (1) ``fetch_s3`` with ``concurrency: 1``: one file at a time, one stream;
  (2) ``fetch_s3`` with ``concurrency: N``: N files in flight;
  (3) boto3 ``download_file`` of each object in turn (TransferManager defaults: 8 MiB ranged parts,
      10 threads per file), unsigned, same client settings otherwise.

Clients are made before the clock starts. (1) and (2) include everything the stage does: the catalog, MD5 verification (hashed while the
bytes stream in), the atomic rename and the HDF5 metadata check; (3) verifies nothing. It also
times (4), hashing the downloaded files again from the page cache: what a verify-after-download
re-read would add to (1) and (2). And it prints what one whole GET and one 8 MiB ranged GET
cost the server alone: moto answers a ranged GET far slower than real S3 does (per request it
copies the object), so ranged parts (used when files are fewer than the concurrency) are
understated here. MB/s are medians over --repeat rounds (orders rotated); ratios
are medians of the ratios within each round. No asserts.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import boto3
import h5py
import numpy as np
import pandas as pd
from boto3.s3.transfer import TransferConfig
from botocore import UNSIGNED
from botocore.config import Config as BotoConfig

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline import sevir  # noqa: E402
from pipeline.config import S3Source  # noqa: E402
from pipeline.sevir import s3  # noqa: E402

BUCKET = "sevir"
SERVER = """
import sys, time, logging
from moto.server import ThreadedMotoServer
logging.getLogger("werkzeug").setLevel(logging.ERROR)
server = ThreadedMotoServer(ip_address="127.0.0.1", port=int(sys.argv[1]), verbose=False)
server.start()
print("ready", flush=True)
while True:
    time.sleep(3600)
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def vil_file(ids: list[str], size: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    with h5py.File(buf, "w") as f:
        f.create_dataset("id", data=np.array([i.encode() for i in ids]))
        f.create_dataset("vil", data=rng.integers(0, 256, (len(ids), size, size, 49), dtype=np.uint8))
    return buf.getvalue()


def upload(url: str, n_files: int, n_events: int, size: int) -> list[str]:
    """Fill the bucket; return the data keys."""
    admin = boto3.client("s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id="bench",
                         aws_secret_access_key="bench",
                         config=BotoConfig(request_checksum_calculation="when_required"))  # fmt: skip
    admin.create_bucket(Bucket=BUCKET)
    rows, keys = [], []
    for k in range(n_files):
        name = f"vil/2019/SEVIR_VIL_STORMEVENTS_2019_{k + 1:02d}01_{k + 1:02d}28.h5"
        ids = [f"S{k:02d}{i:03d}" for i in range(n_events)]
        admin.put_object(Bucket=BUCKET, Key=f"data/{name}", Body=vil_file(ids, size, k), ACL="public-read")
        keys.append(f"data/{name}")
        for i, event_id in enumerate(ids):
            row = dict.fromkeys(sevir.CATALOG_COLUMNS, 0)
            row.update(id=event_id, file_name=name, file_index=i, img_type="vil", event_type="Hail",
                       time_utc=f"2019-{k + 1:02d}-{i + 1:02d} 12:00:00", proj=sevir.PROJ)  # fmt: skip
            rows.append(row)
    catalog = pd.DataFrame(rows, columns=sevir.CATALOG_COLUMNS).to_csv(index=False).encode()
    admin.put_object(Bucket=BUCKET, Key="CATALOG.csv", Body=catalog, ACL="public-read")
    return keys


def ours(url: str, out: Path, concurrency: int) -> float:
    cfg = S3Source(bucket=BUCKET, endpoint_url=url, years=[2019], max_files=0, concurrency=concurrency)
    client = s3.make_client(cfg)  # made before the clock starts, as for boto3 below (~0.5 s of model loading)
    began = time.perf_counter()
    s3.fetch_s3(out, cfg, progress=False, client=client)
    return time.perf_counter() - began


def transfer_manager(url: str, out: Path, keys: list[str]) -> float:
    client = boto3.session.Session().client(
        "s3", endpoint_url=url, config=BotoConfig(signature_version=UNSIGNED, region_name="us-east-1",
                                                  s3={"addressing_style": "path"}, max_pool_connections=10))  # fmt: skip
    began = time.perf_counter()
    for key in keys:
        target = out / key
        target.parent.mkdir(parents=True, exist_ok=True)
        client.download_file(BUCKET, key, str(target), Config=TransferConfig())
    return time.perf_counter() - began


def server_rates(url: str, key: str) -> tuple[float, float]:
    """MB/s of one whole-object GET and of one 8 MiB ranged GET of ``key``: what the server itself
    charges per request (moto copies the object for each ranged answer, which real S3 does not)."""
    client = s3.make_client(S3Source(endpoint_url=url))
    rates = []
    for extra in ({}, {"Range": f"bytes=0-{s3.RANGE_PART_BYTES - 1}"}):
        began = time.perf_counter()
        n = len(client.get_object(Bucket=BUCKET, Key=key, **extra)["Body"].read())
        rates.append(n / (time.perf_counter() - began) / 1e6)
    return rates[0], rates[1]


def reread(out: Path) -> float:
    began = time.perf_counter()
    for path in sorted(out.rglob("*.h5")):
        s3.file_md5(path)
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=6)
    parser.add_argument("--events", type=int, default=4, help="events per file (default 4: ~29 MB files at 384)")
    parser.add_argument("--size", type=int, default=384)
    parser.add_argument("--concurrency", type=int, default=S3Source().concurrency)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "AWS_PROFILE", "AWS_ENDPOINT_URL"):
        os.environ.pop(var, None)
    os.environ["NO_PROXY"] = "127.0.0.1,localhost"

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(port)], stdout=subprocess.PIPE, text=True)
    work = Path(tempfile.mkdtemp(prefix="bench_fetch_", dir=args.workdir))
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready", "moto server did not start"
        keys = upload(url, args.files, args.events, args.size)
        total = args.files * (len(vil_file(["S"] * args.events, args.size, 0)))
        print(f"loopback S3 (moto, child process) at {url}: {args.files} VIL files of {total / args.files / 1e6:.1f} MB "
              f"({total / 1e6:.0f} MB); {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")  # fmt: skip
        whole, ranged = server_rates(url, keys[0])
        print(f"the server itself: one whole-object GET {whole:.0f} MB/s, one 8 MiB ranged GET {ranged:.0f} MB/s")
        runs = {
            "single": lambda out: ours(url, out, 1),
            f"concurrency {args.concurrency}": lambda out: ours(url, out, args.concurrency),
            "boto3 download_file": lambda out: transfer_manager(url, out, keys),
        }
        names = list(runs)
        seconds: dict[str, list[float]] = {name: [] for name in names}
        rereads: list[float] = []
        for r in range(args.repeat):
            for name in names[r % len(names) :] + names[: r % len(names)]:  # rotate the order each round
                out = work / "out"
                seconds[name].append(runs[name](out))
                if name == "single":
                    rereads.append(reread(out))
                shutil.rmtree(out)
        load = os.getloadavg()[0]
    finally:
        server.kill()
        server.wait()
        shutil.rmtree(work, ignore_errors=True)

    mbs = {name: [total / s / 1e6 for s in v] for name, v in seconds.items()}
    single, conc, tm = names

    def ratio(a: str, b: str) -> str:
        values = [x / y for x, y in zip(mbs[a], mbs[b], strict=True)]
        return f"{statistics.median(values):.2f} [{min(values):.2f}-{max(values):.2f}]"

    print(f"\nmedian of {args.repeat} rounds (load average after: {load:.1f})")
    print(f"{'':<24} {'MB/s':>8} {'seconds':>8}")
    for name in names:
        print(f"{name:<24} {statistics.median(mbs[name]):>8.0f} {statistics.median(seconds[name]):>8.2f}")
    print(f"\nconcurrency {args.concurrency} / single stream:      {ratio(conc, single)}")
    print(f"concurrency {args.concurrency} / boto3 download_file: {ratio(conc, tm)}")
    print(f"single stream / boto3 download_file:  {ratio(single, tm)}")
    print(f"MD5 re-read of the downloaded files (skipped: hashed while streaming): "
          f"{statistics.median(rereads):.2f} s = {statistics.median(rereads) / statistics.median(seconds[single]):.0%} "
          "of the single-stream fetch")  # fmt: skip
    if args.json:
        args.json.write_text(
            json.dumps({"mb_per_s": mbs, "seconds": seconds, "reread_s": rereads, "bytes": total}, indent=1)
        )


if __name__ == "__main__":
    main()
