"""The training loop behind stages train_phase1 / train_phase2: :func:`fit`.

One call trains one phase (``train.phase1`` or ``train.phase2``) and leaves ``last.pt`` and
``best.pt`` in ``out_dir`` (see :mod:`pipeline.training.checkpoint`). What a batch does:

- memory models (``model.uses_memory``), phase 1: a phase-1 step, ``model(x, T_out, memory_x=long
  clip, phase=1)`` with the bank trainable, loss, optimiser step; then, with ``align`` (default), a
  phase-2 step on the same batch, ``model(x, T_out, phase=2)``, bank read frozen, loss, step.
  Both losses are logged (``train.loss_phase1``, ``train.loss_align``); the lr schedule advances
  once per batch.
- memory models, phase 2: starts from the phase-1 ``best.pt``; the bank is frozen (no gradient,
  not in the optimiser) and only phase-2 steps run.
- other models: ordinary training (phase 1), fine-tuning from phase-1 best (phase 2).

No host sync inside a step: losses are summed on the device and read every ``train.log_every``
steps (progress bar, non-finite check, the per-step curve: the mean loss of those steps and the lr
they used, logged to MLflow as ``train_step.*`` at the global step) and at the end of the epoch.
The epoch's training metrics are averaged over the DDP ranks (the per-step curve is rank 0's).
Validation runs every epoch on rank 0, over a fixed subset of windows evenly spaced over the val
split when ``train.val_max_windows`` / ``train.val_max_batches`` caps it (the same every epoch),
then the checkpoint is written (rank 0), then ``epoch_callback(epoch, metrics)`` runs.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

import models
from pipeline.errors import ConfigError, DataError, PipelineError
from pipeline.scoring import ScoreAccumulator
from pipeline.training import distributed
from pipeline.training.batch_size import find_batch_size
from pipeline.training.checkpoint import (
    FORMAT,
    identity,
    identity_hash,
    load_weights,
    read_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    stale_reason,
    weights_mismatch,
)
from pipeline.training.data import EpochSampler, augment, heavy_weights, make_loader, to_device
from pipeline.training.ema import EMA
from pipeline.training.losses import ForecastLoss
from pipeline.training.optim import build_optimizer, build_scheduler

log = logging.getLogger("pipeline.training")

CPU_AUTO_BATCH = 4  # train.batch_size: auto on CPU (the search needs a GPU's out-of-memory signal)


class NonFiniteLossError(PipelineError):
    """A NaN or inf loss (or gradient norm): training stopped, the last good checkpoint is kept."""


@dataclass
class FitResult:
    best_key: str
    best_score: float | None
    best_epoch: int | None
    history: list[dict[str, float]]
    checkpoint: Path  # best.pt
    last_checkpoint: Path
    batch_size: int
    stopped_early: bool = False
    resumed_from_epoch: int = 0
    config_hash: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    steps: list[dict[str, float]] = field(default_factory=list)  # per-step curve: step, epoch, train.loss*, lr


# ------------------------------------------------------------------------------------ tracking
class SafeTracker:
    """MLflow calls that can never stop training: the first failure (a tracking server that went
    away) is logged once and tracking is off for the rest of the run. Checkpoints are on disk first."""

    def __init__(self, backend: Any | None) -> None:
        self.backend = backend

    def __getattr__(self, name: str) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            if self.backend is None:
                return None
            try:
                return getattr(self.backend, name)(*args, **kwargs)
            except Exception as err:  # any transport / store error: tracking is best-effort here
                log.warning("MLflow: %s failed (%s); tracking is off for the rest of this run, training goes on",
                            name, str(err).splitlines()[0][:160] if str(err) else type(err).__name__)  # fmt: skip
                self.backend = None
                return None

        return call


@contextlib.contextmanager
def _child_run(parent_run_id: str, name: str) -> Iterator[Any]:
    """A run nested under ``parent_run_id`` in the current tracking store (for callers such as the search)."""
    import mlflow

    with mlflow.start_run(run_name=name, parent_run_id=parent_run_id, nested=True):
        yield mlflow


# -------------------------------------------------------------------------------------- set-up
def resolve_device(name: str, info: distributed.DistInfo | None = None) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device = cuda but no CUDA GPU is visible; set train.device: auto or cpu")
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", info.local_rank if info is not None else torch.cuda.current_device())


def resolve_precision(name: str, device: torch.device) -> str:
    if name == "auto":
        if device.type != "cuda":
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return name


def cpu_threads(requested: int, world_size: int) -> int:
    """``train.threads``; 0 = cores / processes - 1, at least 1 (1 on a 2-core box: more threads
    than free cores make small CPU steps 10-30x slower when the machine is shared)."""
    if requested:
        return requested
    return max(1, (os.cpu_count() or 1) // world_size - 1)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def _better(score: float, best: float | None, mode: str) -> bool:
    if best is None:
        return True
    return score < best if mode == "min" else score > best


def _gpu_mib(device: torch.device) -> dict[str, float]:
    if device.type != "cuda":
        return {}
    return {"gpu_mem_alloc_mib": torch.cuda.memory_allocated(device) / 2**20,
            "gpu_mem_peak_mib": torch.cuda.max_memory_allocated(device) / 2**20}  # fmt: skip


# ---------------------------------------------------------------------------------------- fit
def fit(cfg: Any, phase: int, out_dir: Path, *, epoch_callback: Callable[[int, dict[str, float]], None] | None = None,
        tracker: Any | None = None, mlflow_parent: str | None = None, init_checkpoint: Path | None = None,
        env: dict[str, str] | None = None, progress: bool = True) -> FitResult:  # fmt: skip
    """Train phase ``phase`` with ``cfg.train.phase{phase}``; checkpoints go to ``out_dir``.

    - ``tracker``: an ``mlflow``-like object (what :func:`pipeline.tracking.stage_run` yields) to log
      per-epoch metrics, the best checkpoint and the model config into its active run; or
    - ``mlflow_parent``: a run id; fit opens its own run ``train_phase{phase}`` nested under it.
      Neither: nothing is logged to MLflow.
    - ``init_checkpoint`` (phase 2): the phase-1 checkpoint to start from; default
      ``<train.checkpoint_dir>/phase1/best.pt``.
    - ``env``: the environment of a torchrun / ``torch.distributed.run`` worker (``os.environ``) to
      train data-parallel; None trains in this process alone.
    - ``epoch_callback(epoch, metrics)`` runs after each epoch's validation and checkpoint; an
      exception from it (e.g. ``optuna.TrialPruned``) propagates, checkpoints stay consistent.

    Resumes from ``out_dir/last.pt`` when it was made from the same params, code and windows data
    (its ``identity``); else logs one line saying which differ and trains from scratch.
    Raises :class:`NonFiniteLossError` on a NaN/inf loss, ``DataError`` on a corrupt checkpoint.
    """
    if phase not in (1, 2):
        raise ConfigError(f"phase must be 1 or 2, got {phase!r}")
    if mlflow_parent is not None and tracker is None:
        with _child_run(mlflow_parent, f"train_phase{phase}") as run_tracker:
            run_tracker.log_params(_flat_params(cfg))
            return fit(cfg, phase, out_dir, epoch_callback=epoch_callback, tracker=run_tracker,
                       init_checkpoint=init_checkpoint, env=env, progress=progress)  # fmt: skip
    trainer = Trainer(cfg, phase, Path(out_dir), init_checkpoint=init_checkpoint, env=env, progress=progress)
    try:
        return trainer.run(epoch_callback, SafeTracker(tracker if trainer.dist.is_main else None))
    finally:
        trainer.close()


def _flat_params(cfg: Any) -> dict[str, str]:
    from pipeline.tracking import flatten

    return {**flatten("model", cfg.model), **flatten("train", cfg.train)}


def _step_metrics(point: dict[str, float]) -> dict[str, float]:
    """A per-step curve point as MLflow metrics: ``train_step.loss`` (..._phase1, ..._align), ``train_step.lr``."""
    return {f"train_step.{k.removeprefix('train.')}": v for k, v in point.items() if k not in ("step", "epoch")}


class Trainer:
    """The state of one phase's training; :meth:`run` is the epoch loop. Use through :func:`fit`."""

    def __init__(self, cfg: Any, phase: int, out_dir: Path, init_checkpoint: Path | None = None,
                 env: dict[str, str] | None = None, progress: bool = True) -> None:  # fmt: skip
        self.cfg, self.phase, self.out_dir = cfg, phase, out_dir
        self.pcfg = cfg.train.phase(phase)
        tcfg = cfg.train
        self.progress = progress
        # ----- devices, processes, threads, precision
        want_cuda = tcfg.device in ("auto", "cuda") and torch.cuda.is_available()
        self.dist = distributed.setup("cuda" if want_cuda else "cpu", env)
        self.device = resolve_device(tcfg.device, self.dist)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        torch.set_num_threads(cpu_threads(tcfg.threads, self.dist.world_size))
        self.precision = resolve_precision(tcfg.precision, self.device)
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        seed_everything(tcfg.seed)
        # ----- model (phase 2 starts from phase-1 best)
        self.model = models.build(cfg.model)
        self.uses_memory = bool(self.model.uses_memory)
        self.init_state: dict[str, Any] | None = None
        if phase == 2:
            path = init_checkpoint or tcfg.checkpoint_dir / "phase1" / "best.pt"
            self.init_state = read_checkpoint(path)
            if self.init_state["model_config"] != cfg.model.model_dump(mode="json"):
                raise ConfigError(f"{path}: phase 1 was trained with other model.* params; rerun train_phase1 "
                                  "(dvc repro) before phase 2")  # fmt: skip
        # what this run's checkpoints are made from (params, code, windows data): decides resuming
        self.identity = identity(cfg, phase, self.init_state)
        self.hash = identity_hash(self.identity)
        if self.init_state is not None:
            stale = stale_reason(self.init_state, self.identity, parts=("code", "data"))
            if stale:
                raise DataError(f"{path}: phase 1 was trained from {stale}, not what phase 2 runs with now; rerun train_phase1 "
                                "(dvc repro train_phase1) before phase 2")  # fmt: skip
            load_weights(self.model, self.init_state["model"], path, f"model.name={cfg.model.name}")
            log.info("phase 2 starts from %s (phase-1 epoch %s, %s = %s)", path, self.init_state["epoch"],
                     self.init_state.get("best_key"), self.init_state.get("best_score"))  # fmt: skip
        self.frozen: list[nn.Parameter] = []
        if phase == 2 and self.uses_memory:
            self.model.set_memory_trainable(False)  # before DDP: it ignores parameters without grad
            self.frozen = list(self.model.memory_parameters())
        self.model.to(self.device)
        # ----- data
        win = cfg.windows
        self.in_len, self.out_len = win.in_len, win.out_len
        self.two_step = phase == 1 and self.uses_memory
        self.with_memory = self.two_step or cfg.train.augment.time_shift > 0
        root = Path(win.root)
        self.train_path, self.val_path = root / "train.h5", root / "val.h5"
        pin = self.device.type == "cuda"
        from pipeline.sevir.dataset import WindowDataset

        train_ds = WindowDataset(self.train_path, self.in_len, self.out_len, with_memory=self.with_memory, raw=True)
        self.frame_shape = train_ds.frame_shape
        weights = None
        if tcfg.oversample.enabled:
            o = tcfg.oversample
            weights = heavy_weights(self.train_path, o.threshold, o.min_fraction, o.factor)
        self.sampler = EpochSampler(len(train_ds), tcfg.seed, shuffle=True, weights=weights,
                                    num_replicas=self.dist.world_size, rank=self.dist.rank)  # fmt: skip
        self.loss_fn = ForecastLoss(self.pcfg).to(self.device)
        self.ema_enabled = self.pcfg.ema_decay > 0
        # ----- batch size (auto: by trying real steps, CUDA only)
        if tcfg.batch_size == "auto":
            self.batch_size = self._auto_batch_size(train_ds)
        else:
            self.batch_size = int(tcfg.batch_size)
        n_per_rank = len(self.sampler)
        if n_per_rank == 0:
            raise PipelineError(f"{self.train_path}: no training windows; widen data.split or fetch more events")
        drop_last = n_per_rank >= self.batch_size
        self.train_loader = make_loader(self.train_path, batch_size=self.batch_size, sampler=self.sampler,
                                        num_workers=tcfg.num_workers, pin_memory=pin, with_memory=self.with_memory,
                                        in_len=self.in_len, out_len=self.out_len, drop_last=drop_last)  # fmt: skip
        self.val_loader = None
        self.val_description = ""  # the log line saying what share of the val split validation covers
        if self.dist.is_main:
            # a capped validation: a fixed subset evenly spaced over the split (its first windows are
            # one kind of event), the same every epoch; val_max_windows is the search's batch-free cap
            val_cap = tcfg.val_max_windows or tcfg.val_max_batches * self.batch_size
            self.val_loader = make_loader(self.val_path, batch_size=self.batch_size, sampler=None,
                                          num_workers=tcfg.num_workers, pin_memory=pin, with_memory=False,
                                          in_len=self.in_len, out_len=self.out_len, drop_last=False,
                                          max_windows=val_cap)  # fmt: skip
            sampler = self.val_loader.sampler
            self.val_description = (sampler.describe() if hasattr(sampler, "describe")
                                    else f"validation: all {len(self.val_loader.dataset)} windows of the split")  # fmt: skip
        self.steps_per_epoch = len(self.train_loader)
        if self.pcfg.max_steps_per_epoch:
            self.steps_per_epoch = min(self.steps_per_epoch, self.pcfg.max_steps_per_epoch)
        # curve points every train.log_every steps, but at least 4 per epoch, so a short run still draws a
        # curve (4 steps per epoch: a point per step); long epochs keep log_every (one host sync per point)
        self.log_interval = max(1, min(cfg.train.log_every, self.steps_per_epoch // 4))
        self.opt_steps_per_epoch = math.ceil(self.steps_per_epoch / self.pcfg.grad_accum)
        # ----- optimiser, schedule, scaler, EMA
        self.optimizer = build_optimizer(self.model, self.pcfg, exclude=self.frozen)
        self.scheduler = build_scheduler(self.optimizer, self.pcfg, self.pcfg.epochs * self.opt_steps_per_epoch,
                                         self.opt_steps_per_epoch)  # fmt: skip
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.ema = EMA(self.model, self.pcfg.ema_decay) if self.ema_enabled else None
        # ----- progress state
        self.epoch = 0  # epochs completed
        self.step = 0  # batches completed
        self.best_score: float | None = None
        self.best_epoch: int | None = None
        self.bad_epochs = 0
        self.history: list[dict[str, float]] = []
        self.step_curve: list[dict[str, float]] = []  # every log_every steps: step, epoch, train.loss*, lr
        self.finished = False
        self.stopped_early = False
        self.resumed_from = 0
        self.checkpoint_s = self.checkpoint_cpu_s = 0.0  # time spent writing checkpoints in this process
        self._resume()
        # ----- wrappers (after loading weights)
        self.train_model: nn.Module = self.model
        if self.dist.enabled:
            find_unused = bool(self._unused_trainable())
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_model = nn.parallel.DistributedDataParallel(self.model, device_ids=ids,
                                                                   find_unused_parameters=find_unused)  # fmt: skip
        if cfg.train.compile:
            self.train_model = torch.compile(self.train_model)

    def _step_phases(self) -> tuple[int, ...]:
        """The forward paths a batch takes: (1, 2) phase-1 + alignment, (1,) phase-1 only, (2,) otherwise."""
        if self.two_step:
            return (1, 2) if self.pcfg.align else (1,)
        return (2,)

    def _unused_trainable(self) -> list[str]:
        """Trainable parameters that some step of a batch leaves without a gradient (DDP's
        ``find_unused_parameters``): e.g. the bank in the alignment step, one memory encoder per phase."""
        unused: set[str] = set()
        for step_phase in self._step_phases():
            unused.update(self.model.unused_parameters(step_phase))
        return [n for n, p in self.model.named_parameters() if n in unused and p.requires_grad]

    # ------------------------------------------------------------------------------ checkpoints
    @property
    def last_path(self) -> Path:
        return self.out_dir / "last.pt"

    @property
    def best_path(self) -> Path:
        return self.out_dir / "best.pt"

    def _resume(self) -> None:
        if not self.last_path.exists():
            return
        state = read_checkpoint(self.last_path)  # on the CPU (RNG states must be); corrupt: one-line DataError
        # Only a run of the same params, code and windows data resumes (a finished one trains nothing);
        # anything else trains from scratch, never on top of weights another version made.
        why = stale_reason(state, self.identity)
        if why is None and state.get("phase") != self.phase:
            why = f"phase {state.get('phase')}"
        if why is not None:
            log.warning("%s was made from %s (config hash %s, now %s): not resumed, starting fresh",
                        self.last_path, why, state.get("config_hash"), self.hash)  # fmt: skip
            return
        load_weights(self.model, state["train_model"] if "train_model" in state else state["model"], self.last_path)
        if self.ema is not None:
            bad = weights_mismatch(self.ema.state_dict(), state["model"])
            if bad:
                raise DataError(f"{self.last_path}: EMA weights do not fit the model ({bad}); delete it and rerun "
                                "dvc repro (it retrains)")  # fmt: skip
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            self.ema.load_state_dict(state["model"])
        set_rng_state(state["rng"])
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.best_score, self.best_epoch = state["best_score"], state.get("best_epoch")
        self.bad_epochs = int(state.get("bad_epochs", 0))
        self.history = list(state.get("history", []))
        self.step_curve = list(state.get("step_curve", []))
        self.finished = bool(state.get("finished", False))
        self.stopped_early = bool(state.get("stopped_early", False))
        self.resumed_from = self.epoch
        log.info("resuming phase %d from %s: epoch %d of %d done, step %d", self.phase, self.last_path,
                 self.epoch, self.pcfg.epochs, self.step)  # fmt: skip

    def _state(self) -> dict[str, Any]:
        weights = self.ema.state_dict() if self.ema is not None else self.model.state_dict()
        height, width = self.frame_shape
        state: dict[str, Any] = {
            "format": FORMAT,
            "model": {k: v.detach().cpu() for k, v in weights.items()},
            "model_config": self.cfg.model.model_dump(mode="json"),
            "data": {"in_len": self.in_len, "out_len": self.out_len, "height": height, "width": width},
            "identity": self.identity,
            "config_hash": self.hash,
            "phase": self.phase,
            "epoch": self.epoch,
            "step": self.step,
            "best_key": self.pcfg.best_key,
            "best_score": self.best_score,
            "best_epoch": self.best_epoch,
            "bad_epochs": self.bad_epochs,
            "history": self.history,
            "step_curve": self.step_curve,
            "finished": self.finished,
            "stopped_early": self.stopped_early,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng_state(),
            "batch_size": self.batch_size,
        }
        if self.ema is not None:
            state["train_model"] = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        return state

    def _write_checkpoints(self, improved: bool) -> None:
        save_checkpoint(self._state(), self.last_path)
        if improved:
            tmp = self.best_path.with_name(f".{self.best_path.name}.{os.getpid()}.tmp")
            shutil.copyfile(self.last_path, tmp)
            os.replace(tmp, self.best_path)

    # ------------------------------------------------------------------------------ one step
    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _forward_loss(self, model: nn.Module, batch: dict[str, torch.Tensor],
                      step_phase: int) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:  # fmt: skip
        """(loss, detached loss parts, prediction) of one forward: phase-1 path (long clip) or phase-2 path."""
        x, y = batch["inputs"], batch["targets"]
        with self._autocast():
            if step_phase == 1:
                pred = model(x, self.out_len, memory_x=batch["memory"], phase=1)
            else:
                pred = model(x, self.out_len, phase=2) if self.uses_memory else model(x, self.out_len)
            loss, parts = self.loss_fn(pred, y)
            if self.pcfg.recon_weight > 0 and x.shape[1] >= 2:
                # input reconstruction: forecast the second half of the inputs from the first half
                half = x.shape[1] // 2
                recon = model(x[:, :half], x.shape[1] - half)
                r_loss, _ = self.loss_fn(recon, x[:, half:])
                loss = loss + self.pcfg.recon_weight * r_loss
                parts["recon"] = r_loss.detach()
        return loss, parts, pred

    def _backward_step(self, loss: torch.Tensor, sync: bool, last_micro: bool, accum: int = 1) -> torch.Tensor | None:
        """Backward of one (micro-)step of an accumulation group of ``accum`` micro-steps (the
        epoch's last group can be shorter than ``grad_accum``), so the step takes their mean
        gradient; on the last micro-step: unscale, clip, optimiser step.
        Returns the gradient norm tensor (or None) without reading it."""
        ctx = self.train_model.no_sync() if (self.dist.enabled and not sync and hasattr(self.train_model, "no_sync")) \
            else contextlib.nullcontext()  # fmt: skip
        with ctx:
            self.scaler.scale(loss / accum).backward()
        if not last_micro:
            return None
        norm = None
        if self.pcfg.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.pcfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)  # set_to_none: the frozen / unused bank keeps grad None
        if self.ema is not None:
            self.ema.update(self.model)
        return norm

    # ------------------------------------------------------------------------------ the loop
    def run(self, epoch_callback: Callable[[int, dict[str, float]], None] | None, tracker: SafeTracker) -> FitResult:
        pcfg = self.pcfg
        if self.dist.is_main:
            n_params = sum(p.numel() for p in self.model.parameters())
            log.info("phase %d: %s (%s parameters) on %s, %s, batch %d x %d process(es), %d steps/epoch, %d epochs%s",
                     self.phase, self.cfg.model.name, f"{n_params:,}", self.device, self.precision, self.batch_size,
                     self.dist.world_size, self.steps_per_epoch, pcfg.epochs,
                     " (phase-1 step + alignment step per batch)" if self.two_step and pcfg.align else "")  # fmt: skip
            log.info("%s", self.val_description)
            tracker.log_params({"train.resolved.device": str(self.device), "train.resolved.precision": self.precision,
                                "train.resolved.batch_size": str(self.batch_size),
                                "train.resolved.world_size": str(self.dist.world_size),
                                "train.config_hash": self.hash})  # fmt: skip
            for row in self.history:  # a resumed run's earlier epochs, so its MLflow run has whole curves
                tracker.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=int(row["epoch"]))
            for point in self.step_curve:
                tracker.log_metrics(_step_metrics(point), step=int(point["step"]))
        if self.finished:
            log.info("phase %d already finished (%s); nothing to train", self.phase, self.last_path)
        while not self.finished:
            metrics = self._train_epoch(tracker)
            t_val = time.perf_counter()
            metrics.update(self._validate())
            metrics["val_time_s"] = time.perf_counter() - t_val
            metrics = distributed.broadcast_object(metrics, self.dist)
            key = pcfg.best_key
            if key not in metrics:
                raise ConfigError(f"train.phase{self.phase}.best_key = {key!r} is not a logged metric; choose one of "
                                  f"{', '.join(sorted(k for k in metrics if k.startswith(('val.', 'train.'))))}")  # fmt: skip
            score = metrics[key]
            # the first epoch always writes best.pt (phase 2 and evaluation need one), even when its
            # score is undefined (NaN: e.g. CSI-M of a model that forecasts no rain yet)
            improved = (
                math.isfinite(score) and _better(score, self.best_score, pcfg.mode())
            ) or self.best_epoch is None
            if improved:
                self.best_score = float(score) if math.isfinite(score) else None
                self.best_epoch, self.bad_epochs = self.epoch + 1, 0
            else:
                self.bad_epochs += 1
            self.epoch += 1
            metrics["best_score"] = self.best_score if self.best_score is not None else float("nan")
            self.history.append(metrics)
            self.stopped_early = bool(pcfg.early_stop_patience and self.bad_epochs >= pcfg.early_stop_patience)
            self.finished = self.epoch >= pcfg.epochs or self.stopped_early
            if self.dist.is_main:
                t_ckpt, c_ckpt = time.perf_counter(), time.process_time()
                self._write_checkpoints(improved)
                self.checkpoint_s += time.perf_counter() - t_ckpt
                self.checkpoint_cpu_s += time.process_time() - c_ckpt
                tracker.log_metrics({k: v for k, v in metrics.items() if k != "epoch"}, step=self.epoch)
                log.info("phase %d epoch %d/%d: %s%s", self.phase, self.epoch, pcfg.epochs,
                         ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k.startswith(("train.loss", "val."))),
                         " (best)" if improved else "")  # fmt: skip
                if self.stopped_early:
                    log.info("early stop: %s has not improved for %d epochs (best %.4g at epoch %d)", key,
                             self.bad_epochs, self.best_score, self.best_epoch)  # fmt: skip
            distributed.barrier(self.dist)
            if epoch_callback is not None:
                epoch_callback(self.epoch, metrics)
        if self.dist.is_main:
            self._log_artifacts(tracker)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # the next phase (or trial) starts from a clean cache
        return FitResult(best_key=pcfg.best_key, best_score=self.best_score, best_epoch=self.best_epoch,
                         history=list(self.history), checkpoint=self.best_path, last_checkpoint=self.last_path,
                         batch_size=self.batch_size, stopped_early=self.stopped_early,
                         resumed_from_epoch=self.resumed_from, config_hash=self.hash,
                         extra={"checkpoint_s": self.checkpoint_s, "checkpoint_cpu_s": self.checkpoint_cpu_s},
                         steps=list(self.step_curve))  # fmt: skip

    def _train_epoch(self, tracker: SafeTracker) -> dict[str, float]:
        pcfg, device = self.pcfg, self.device
        self.sampler.set_epoch(self.epoch)
        self.train_model.train()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        names = ["loss_phase1", "loss_align"] if self.two_step else ["loss"]
        if self.two_step and not pcfg.align:
            names = ["loss_phase1"]
        sums = torch.zeros(len(names) + 2, device=device)  # losses..., l1, mse (of the main step)
        bad_step = torch.full((), -1, dtype=torch.int64, device=device)  # first batch with a non-finite value
        seen = 0
        logged, logged_at = [0.0] * len(names), 0  # loss sums (host) and batch index at the last log point
        lr_used = float(self.optimizer.param_groups[0]["lr"])  # the lr of the last optimiser step taken
        t0, c0 = time.perf_counter(), time.process_time()
        bar = tqdm(total=self.steps_per_epoch, desc=f"phase {self.phase} epoch {self.epoch + 1}/{pcfg.epochs}",
                   unit="step", disable=not (self.progress and self.dist.is_main), leave=False, dynamic_ncols=True)  # fmt: skip
        batches = iter(self.train_loader)
        try:
            for i in range(self.steps_per_epoch):
                batch = augment(to_device(next(batches), device), self.cfg.train.augment, self.in_len, self.out_len)
                micro = i % pcfg.grad_accum
                # micro-steps in this accumulation group: the epoch's last one may be short
                group = min(pcfg.grad_accum, self.steps_per_epoch - (i - micro))
                last_micro = micro == group - 1
                step_losses = []
                norms = []
                if self.two_step:
                    loss, parts, _ = self._forward_loss(self.train_model, batch, 1)
                    norms.append(self._backward_step(loss, sync=last_micro, last_micro=last_micro, accum=group))
                    step_losses.append(loss.detach())
                    if pcfg.align:
                        loss2, _, _ = self._forward_loss(self.train_model, batch, 2)
                        norms.append(self._backward_step(loss2, sync=True, last_micro=last_micro, accum=group))
                        step_losses.append(loss2.detach())
                else:
                    loss, parts, _ = self._forward_loss(self.train_model, batch, 2)
                    norms.append(self._backward_step(loss, sync=last_micro, last_micro=last_micro, accum=group))
                    step_losses.append(loss.detach())
                if last_micro:
                    lr_used = float(self.optimizer.param_groups[0]["lr"])  # what this step used (a host float)
                    self.scheduler.step()
                values = torch.stack([*step_losses, parts["l1"], parts["mse"]])
                sums += values.float()
                finite = torch.isfinite(values).all()
                if self.precision != "fp16":  # with fp16, inf gradients are the scaler's business
                    for n in norms:
                        if n is not None:
                            finite = finite & torch.isfinite(n)
                bad_step = torch.where((bad_step < 0) & ~finite, torch.full_like(bad_step, self.step + 1), bad_step)
                self.step += 1
                seen += batch["inputs"].shape[0]
                bar.update(1)
                if (i + 1) % self.log_interval == 0 or i + 1 == self.steps_per_epoch:
                    # the one host sync, every log_every steps: loss sums and the first bad step together
                    host = torch.cat([sums[: len(names)].double(), bad_step.double().view(1)]).tolist()
                    self._check_finite(int(host[-1]))
                    window = (i + 1) - logged_at
                    point = {"step": float(self.step), "epoch": float(self.epoch + 1)}
                    for k, name in enumerate(names):
                        point[f"train.{name}"] = (host[k] - logged[k]) / window
                    if self.two_step:
                        point["train.loss"] = point["train.loss_align" if pcfg.align else "train.loss_phase1"]
                    point["lr"] = lr_used
                    logged, logged_at = host[: len(names)], i + 1
                    self.step_curve.append(point)
                    if self.dist.is_main:
                        tracker.log_metrics(_step_metrics(point), step=self.step)
                    elapsed = time.perf_counter() - t0
                    post = {"loss": f"{host[0] / (i + 1):.4f}", "lr": f"{lr_used:.2e}",
                            "samples/s": f"{seen * self.dist.world_size / max(elapsed, 1e-9):.2f}"}  # fmt: skip
                    mem = _gpu_mib(device)
                    if mem:
                        post["gpu"] = f"{mem['gpu_mem_alloc_mib']:.0f}/{mem['gpu_mem_peak_mib']:.0f}MiB"
                    bar.set_postfix(post, refresh=False)
        finally:
            bar.close()
        self._check_finite(bad_step)
        elapsed = time.perf_counter() - t0
        sums = distributed.all_reduce_mean(sums, self.dist)  # every rank's shard, not rank 0's alone
        means = (sums / max(1, self.steps_per_epoch)).tolist()
        metrics: dict[str, float] = {"epoch": float(self.epoch + 1)}
        for name, value in zip(names, means, strict=False):
            metrics[f"train.{name}"] = value
        if self.two_step:
            metrics["train.loss"] = metrics["train.loss_align" if pcfg.align else "train.loss_phase1"]
        metrics["train.l1"], metrics["train.mse"] = means[-2], means[-1]
        metrics["lr"] = lr_used  # the lr of the epoch's last optimiser step (not the next, unused one)
        metrics["samples_per_s"] = seen * self.dist.world_size / max(elapsed, 1e-9)
        metrics["epoch_time_s"] = elapsed
        metrics["epoch_cpu_s"] = time.process_time() - c0  # this process's CPU time (steadier on a shared machine)
        metrics.update(_gpu_mib(device))
        return metrics

    def _check_finite(self, bad_step: torch.Tensor | int) -> None:
        bad = int(bad_step.item()) if isinstance(bad_step, torch.Tensor) else int(bad_step)
        bad = max(bad, -1)
        if distributed.any_rank(bad >= 0, self.dist):
            where = f"step {bad}" if bad >= 0 else "on another rank"
            kept = (f"the last good checkpoint {self.last_path} (epoch {self.epoch}) is kept" if self.epoch
                    else "no checkpoint of this run was written")  # fmt: skip
            raise NonFiniteLossError(
                f"train.phase{self.phase}: non-finite loss or gradient at epoch {self.epoch + 1} {where} "
                f"(model.name={self.cfg.model.name}, precision {self.precision}); {kept}. "
                f"Lower train.phase{self.phase}.lr or set train.phase{self.phase}.grad_clip"
            )

    @torch.no_grad()
    def _validate(self) -> dict[str, float]:
        """Validation on rank 0 (the inference path: phase-2 forward; EMA weights when EMA is on), over
        the val loader's windows: the whole split, or the fixed evenly spaced subset of a capped one."""
        if not self.dist.is_main or self.val_loader is None:
            return {}
        model = self.model
        if self.ema is not None:
            model = copy.deepcopy(self.model)
            model.load_state_dict(self.ema.state_dict())
        was_training = model.training
        model.eval()
        sums = torch.zeros(3, device=self.device, dtype=torch.float64)
        n_batches, n_pixels = 0, 0
        ev = self.cfg.evaluate  # the same thresholds and pooling as stage evaluate; no FSS (cost)
        scores = ScoreAccumulator(thresholds=ev.thresholds, pool_sizes=ev.pool_sizes, out_len=self.out_len,
                                  ssim=ev.ssim, fss_scales=(), device=self.device)  # fmt: skip
        try:  # the val loader's sampler holds the capped subset (the same windows every epoch)
            for batch in tqdm(self.val_loader, desc="validate", unit="batch", leave=False, disable=not self.progress):
                batch = to_device(batch, self.device)
                loss, _, pred = self._forward_loss(model, batch, 2)
                err = pred.float() - batch["targets"]
                scores.update(pred.float(), batch["targets"])
                sums += torch.stack(
                    [loss.double() * err.numel(), err.square().sum().double(), err.abs().sum().double()]
                )
                n_batches += 1
                n_pixels += err.numel()
        finally:
            if was_training:
                model.train()
        if n_batches == 0:
            return {}
        total = sums.tolist()
        out = {"val.loss": total[0] / n_pixels, "val.mse": total[1] / n_pixels, "val.mae": total[2] / n_pixels}
        result = scores.compute()
        nan = float("nan")  # an undefined score (0/0, e.g. no event at any threshold): NaN in the curves
        for key, value in result.items():
            if key.endswith("_m") or key == "ssim":
                out[f"val.{key}"] = nan if value is None else float(value)
        for thr, value in result["csi"].items():
            out[f"val.csi.{thr}"] = nan if value is None else float(value)
        return out

    # ------------------------------------------------------------------------------ batch size
    def _auto_batch_size(self, train_ds) -> int:
        if self.device.type != "cuda":
            log.info("train.batch_size = auto needs CUDA (it tries real steps until out of memory); using %d on %s",
                     CPU_AUTO_BATCH, self.device)  # fmt: skip
            return CPU_AUTO_BATCH
        try_step, restore = self.batch_probe(train_ds)
        try:
            size = find_batch_size(try_step, self.cfg.train.max_batch_size, at_most=len(train_ds))
        finally:
            restore()
        if self.dist.enabled:  # every rank trains the same batch: the smallest found
            t = torch.tensor([size], device=self.device)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
            size = int(t.item())
        return size

    def batch_probe(self, train_ds) -> tuple[Callable[[int], None], Callable[[], None]]:
        """(try_step, restore): ``try_step(b)`` runs one real training step (every forward and backward
        of a batch, AdamW steps included, so optimiser state counts) at batch ``b``, built from the first
        training window; ``restore()`` puts the weights back and frees the probe's optimiser."""
        sample = train_ds[0]
        snapshot = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        optimizer = build_optimizer(self.model, self.pcfg, exclude=self.frozen)
        steps = self._step_phases()

        def try_step(b: int) -> None:
            batch = to_device({k: v.unsqueeze(0).expand(b, *v.shape).contiguous() for k, v in sample.items()},
                              self.device)  # fmt: skip
            try:
                for step_phase in steps:
                    loss, _, _ = self._forward_loss(self.model, batch, step_phase)
                    loss.backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
            finally:
                optimizer.zero_grad(set_to_none=True)

        def restore() -> None:
            self.model.load_state_dict(snapshot)
            optimizer.state.clear()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

        return try_step, restore

    # ------------------------------------------------------------------------------ artifacts
    def _log_artifacts(self, tracker: SafeTracker) -> None:
        config_path = self.out_dir / "model_config.json"
        tmp = config_path.with_name(f".{config_path.name}.tmp")
        tmp.write_text(json.dumps(self.cfg.model.model_dump(mode="json"), indent=2) + "\n")
        os.replace(tmp, config_path)
        if tracker.backend is None:
            return
        tracker.log_artifact(str(config_path), artifact_path=f"phase{self.phase}")
        # Checkpoints stay on disk (DVC tracks them): the evaluate stage logs the phase-2 weights as
        # an MLflow model. The run records the windows it read as dataset inputs.
        from pipeline.tracking import log_windows_inputs

        try:
            log_windows_inputs(tracker, self.cfg.windows.root, ("train", "val"))
        except Exception as err:  # noqa: BLE001 - bookkeeping never fails a finished training
            log.warning(
                "MLflow: windows dataset inputs not logged (%s)",
                str(err).splitlines()[0][:160] if str(err) else type(err).__name__,
            )
        tracker.set_tags({"train.best_key": self.pcfg.best_key, "train.best_score": str(self.best_score),
                          "train.best_epoch": str(self.best_epoch)})  # fmt: skip

    def close(self) -> None:
        for loader in (getattr(self, "train_loader", None), getattr(self, "val_loader", None)):
            ds = getattr(loader, "dataset", None)
            if ds is not None:
                ds.close()
