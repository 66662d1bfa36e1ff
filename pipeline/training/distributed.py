"""Distributed data parallel: process-group set-up from the launcher's environment, and the launcher.

A DDP worker is any process started with ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``
and ``MASTER_PORT`` in its environment (torchrun / ``torch.distributed.run`` set them). Backend:
NCCL on CUDA, gloo on CPU. Rank 0 alone logs, writes checkpoints and reports.

``launch(module_args, nproc)`` runs ``python -m torch.distributed.run --standalone --nproc-per-node N
-m <module> <args>``: the stage starts its own workers, so ``train.nproc_per_node: N`` works under
``dvc repro``. Multi-node runs call torchrun on each node over the same entrypoint (README).
"""

from __future__ import annotations

import datetime as dt
import logging
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pipeline.errors import PipelineError

log = logging.getLogger("pipeline.training")


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def in_launched_worker(env: Mapping[str, str]) -> bool:
    """True for a process started by torchrun / torch.distributed.run (its environment ``env``)."""
    return all(key in env for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def setup(device_type: str, env: Mapping[str, str] | None) -> DistInfo:
    """Join the process group described by ``env`` (the launcher's variables); one process without."""
    if env is None or not in_launched_worker(env) or int(env["WORLD_SIZE"]) <= 1:
        return DistInfo()
    rank, world, local_rank = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend, rank=rank, world_size=world, timeout=dt.timedelta(minutes=30))
    log.info("DDP: rank %d of %d (local %d), backend %s", rank, world, local_rank, dist.get_backend())
    return DistInfo(rank, world, local_rank)


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def broadcast_object(obj, info: DistInfo):
    """``obj`` of rank 0 on every rank."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_mean(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The element-wise mean of ``t`` over the ranks (a collective: every rank must call it); ``t``
    itself without DDP. ``t`` lives where the backend reduces (CUDA for NCCL, CPU for gloo)."""
    if not info.enabled:
        return t
    out = t.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / info.world_size


def any_rank(flag: bool, info: DistInfo) -> bool:
    """True when ``flag`` is true on any rank (a collective: every rank must call it)."""
    if not info.enabled:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def launch(module: str, args: list[str], nproc: int) -> int:
    """Run ``python -m module args`` as ``nproc`` DDP workers on this node; returns the exit code."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", module, *args]  # fmt: skip
    log.info("launching %d DDP workers: %s", nproc, " ".join(cmd))
    try:
        return subprocess.run(cmd, check=False).returncode
    except OSError as err:
        raise PipelineError(f"train.nproc_per_node = {nproc}: cannot start the workers ({err})") from None
