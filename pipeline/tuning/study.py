"""Study storage, creation/loading and the worker loop.

Storage (``search.storage``):

- ``None``: an Optuna journal file (default ``artifacts/search/optuna.journal``). Several
  workers on one machine share it; its file lock serialises the appends.
- an RDB URL (``postgresql://user:pw@host:5432/db``, ``sqlite:///...``): workers on many
  machines share the study.
- any other string: a journal file at that path.

A study is stored as ``<search.study_name>-<hash>``, the hash taken over the params that stay
fixed during the study (model, train.phase1, data, windows, the objective's budget and metric),
the training code and the windows files (as a checkpoint's identity takes them), so changing one
of them starts a new study instead of mixing incomparable trials or passing a finished study of
old code or data as new, while the same params, code and windows resume the same study
(``load_if_exists``). The space is stored with the study; a
changed space on the same study is a one-line :class:`ConfigError`.

Workers run until the study holds ``n_trials`` finished trials (complete, pruned or failed);
a killed worker's trials are found (its pid is gone on this host, or its heartbeat is older than
``grace_s``), marked failed with the reason, and retried up to ``max_retries`` times. On a journal
the count-and-start step is serialised by a file lock, so N trials are exactly N however many
workers run; on PostgreSQL an advisory lock does the same across machines (other RDBs: up to one
extra trial per concurrent worker may start).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import socket
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from pipeline.config import Config, SearchConfig
from pipeline.errors import ConfigError, PipelineError
from pipeline.tracking import check_store_url, redact
from pipeline.tuning import space as space_mod

log = logging.getLogger("pipeline.tuning")

DEFAULT_JOURNAL = Path("artifacts/search/optuna.journal")
ATTR_SPACE = "search_space"
ATTR_BASE = "fixed_params"
ATTR_WORKER = "worker"  # "<host>:<pid>" of the process running the trial
ATTR_BEAT = "heartbeat"  # unix time of its last heartbeat
ATTR_RETRY_OF = "retry_of"  # number of the trial this one re-runs
ATTR_REASON = "fail_reason"  # why a trial failed or was pruned
ATTR_IMPOSSIBLE = "impossible"  # a combination the config check refused (costs no training)
ATTR_STALE = "stale"  # a trial whose worker died (does not count towards n_trials when retried)

_RDB_SCHEMES = ("postgresql", "mysql", "sqlite", "mssql", "oracle")


def is_rdb_url(storage: str | None) -> bool:
    return bool(storage) and "://" in storage and storage.split("://", 1)[0].split("+")[0].lower() in _RDB_SCHEMES  # type: ignore[union-attr]


def worker_lock(storage: str | None, journal: Path) -> Path | str | None:
    """What serialises the count-and-start step: the journal's side lock file, or the PostgreSQL URL."""
    if not storage:
        return Path(f"{journal}.workers.lock")
    if is_rdb_url(storage):
        return storage if storage.lower().startswith("postgresql") else None
    return Path(f"{storage}.workers.lock")


def describe_storage(storage: str | None, journal: Path) -> str:
    return redact(storage) if is_rdb_url(storage) else str(Path(storage) if storage else journal)


def open_storage(search: SearchConfig, journal: Path) -> optuna.storages.BaseStorage:
    """The study storage named by ``search.storage`` (``journal`` when it is null)."""
    storage = search.storage
    if is_rdb_url(storage):
        check_store_url(storage, "search.storage")  # type: ignore[arg-type]
        try:
            return optuna.storages.RDBStorage(storage, engine_kwargs={"pool_pre_ping": True})  # type: ignore[arg-type]
        except Exception as err:  # noqa: BLE001 - sqlalchemy/optuna raise many kinds; one line for all
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise PipelineError(
                f"search.storage = {redact(storage)}: not usable ({first}); fix search.storage"
            ) from None  # type: ignore[arg-type]
    if storage and "://" in storage:
        raise ConfigError(
            f"search.storage = {redact(storage)}: unknown URL scheme; use null (journal file), a file path, or postgresql://user:pw@host:5432/db"
        )
    path = Path(storage) if storage else journal
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        backend = optuna.storages.journal.JournalFileBackend(str(path))
    except OSError as err:
        raise PipelineError(f"search.storage: journal file {path} not usable ({err}); fix search.storage") from None
    return optuna.storages.JournalStorage(backend)


def fixed_params(cfg: Config) -> dict[str, Any]:
    """What a study's trials share besides the space: drives :func:`study_name`."""
    dump = cfg.model_dump(mode="json")
    train = {
        k: v
        for k, v in dump["train"].items()
        if k not in ("phase2", "checkpoint_dir", "device", "num_workers", "threads", "log_every", "nproc_per_node")
    }
    search = {k: dump["search"][k] for k in ("epochs", "max_steps_per_epoch", "val_max_batches", "metric", "direction")}
    return {"data": dump["data"], "windows": dump["windows"], "model": dump["model"], "train": train, "search": search}


def study_name(cfg: Config) -> str:
    """``<search.study_name>-<8 hex>``: one study per set of fixed params, training code and windows.

    The code and windows are hashed as a training checkpoint's identity hashes them
    (:func:`pipeline.training.checkpoint.code_hash`, :func:`~pipeline.training.checkpoint.data_fingerprint`):
    the study's journal persists across ``dvc repro``, and without them a change to ``models/`` would
    rerun the stage only to find its trials finished and report the old code's scores.
    """
    from pipeline.errors import DataError
    from pipeline.training.checkpoint import code_hash, data_fingerprint

    try:
        data = data_fingerprint(cfg.windows.root)
    except DataError:  # no windows yet (e.g. the dashboard before chunk): trials cannot run either
        data = None
    blob = json.dumps({"params": fixed_params(cfg), "code": code_hash(), "data": data}, sort_keys=True)
    return f"{cfg.search.study_name}-{hashlib.sha1(blob.encode()).hexdigest()[:8]}"


def make_sampler(search: SearchConfig, worker_seed: int | None = None) -> optuna.samplers.BaseSampler:
    seed = search.sampler_seed if worker_seed is None else worker_seed
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(2, min(10, search.n_trials // 2)))


def make_pruner(search: SearchConfig) -> optuna.pruners.BasePruner:
    if search.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=search.pruner_warmup_epochs)
    if search.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(search.epochs, 1))
    return optuna.pruners.NopPruner()


def _existing_names(storage: optuna.storages.BaseStorage) -> list[str]:
    return [s.study_name for s in storage.get_all_studies()]


def create_or_load(
    cfg: Config,
    storage: optuna.storages.BaseStorage,
    storage_desc: str,
    *,
    name: str | None = None,
    create: bool = True,
    worker_seed: int | None = None,
) -> optuna.Study:
    """Create the study (or load it: ``load_if_exists``); ``create=False`` joins an existing one only.

    A stored study whose space differs from ``search.space`` is a :class:`ConfigError`; so is
    joining a study name the storage does not hold.
    """
    search = cfg.search
    name = name or study_name(cfg)
    sampler, pruner = make_sampler(search, worker_seed), make_pruner(search)
    sig = space_mod.signature(search.space)
    if not create:
        if name not in _existing_names(storage):
            held = ", ".join(_existing_names(storage)) or "no studies"
            raise ConfigError(
                f"search.study_name: study '{name}' not found in {storage_desc} (it holds: {held}); "
                "start it with `dvc repro search/dvc.yaml` (or `python -m pipeline.search`) first, or pass --study with one of those names"
            )
        study = optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner)
    else:
        with quiet_optuna():  # "Using an existing study ..." - we log our own line
            study = optuna.create_study(
                study_name=name,
                storage=storage,
                sampler=sampler,
                pruner=pruner,
                direction=search.direction,
                load_if_exists=True,
            )
    stored = study.user_attrs.get(ATTR_SPACE)
    if stored is None and create:
        study.set_user_attr(ATTR_SPACE, sig)
        study.set_user_attr(ATTR_BASE, json.dumps(fixed_params(cfg), sort_keys=True))
        study.set_user_attr("metric", search.metric)
    elif stored is not None and stored != sig:
        raise ConfigError(
            f"search.space no longer matches the trials stored in study '{name}' ({space_mod.describe_change(stored, sig)}) "
            f"in {storage_desc}; set search.study_name to a new name (e.g. -S search.study_name={search.study_name}-v2) "
            "or restore the previous space"
        )
    if study.direction.name.lower() != search.direction:
        raise ConfigError(
            f"search.direction = {search.direction}, but study '{name}' was created to {study.direction.name.lower()}; set search.study_name to a new name"
        )
    return study


# ----------------------------------------------------------------------- workers
def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def worker_seed(search: SearchConfig) -> int:
    """A seed for an extra worker: distinct per host and process, derived from search.sampler_seed."""
    return (search.sampler_seed * 1_000_003 + zlib.crc32(worker_id().encode())) % (2**31)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_stale(trial: FrozenTrial, grace_s: float, now: float) -> str | None:
    """Why a RUNNING trial is stale (its worker is gone), or None while it is alive."""
    owner = str(trial.system_attrs.get(ATTR_WORKER, ""))
    host, _, pid = owner.rpartition(":")
    if host == socket.gethostname() and pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
        return f"worker {owner} died"
    beat = trial.system_attrs.get(ATTR_BEAT)
    if beat is None and trial.datetime_start is not None:
        beat = trial.datetime_start.timestamp()
    if beat is not None and now - float(beat) > grace_s and not owner.endswith(f":{os.getpid()}"):
        return f"no heartbeat from {owner or 'its worker'} for {now - float(beat):.0f} s (grace {grace_s} s)"
    return None


def fail_stale_trials(study: optuna.Study, search: SearchConfig) -> list[int]:
    """Mark trials of dead workers FAIL (reason recorded) and enqueue a retry; returns their numbers."""
    storage = study._storage
    failed: list[int] = []
    now = time.time()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        reason = _is_stale(trial, search.grace_s, now)
        if reason is None:
            continue
        try:
            storage.set_trial_user_attr(trial._trial_id, ATTR_REASON, f"stale: {reason}")
            storage.set_trial_system_attr(trial._trial_id, ATTR_STALE, True)
            storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        except (optuna.exceptions.UpdateFinishedTrialError, RuntimeError):
            continue  # another worker got there first
        failed.append(trial.number)
        retries = int(trial.user_attrs.get("retries", 0))
        log.warning("trial %d: %s; marked failed", trial.number, reason)
        if retries < search.max_retries and trial.params:
            study.enqueue_trial(
                trial.params, user_attrs={ATTR_RETRY_OF: trial.number, "retries": retries + 1}, skip_if_exists=False
            )
            log.info("trial %d: re-queued (retry %d of %d)", trial.number, retries + 1, search.max_retries)
    return failed


def counted(trials: list[FrozenTrial]) -> int:
    """Trials that count towards n_trials: finished ones and running ones; not impossible
    combinations (refused before training), nor trials of dead workers that were retried."""
    n = 0
    for t in trials:
        if t.state == TrialState.PRUNED and t.user_attrs.get(ATTR_IMPOSSIBLE):
            continue
        if t.state == TrialState.RUNNING or t.state in (TrialState.COMPLETE, TrialState.PRUNED):
            n += 1
        elif t.state == TrialState.FAIL and not t.system_attrs.get(ATTR_STALE):
            n += 1
        elif t.state == TrialState.FAIL and t.system_attrs.get(ATTR_STALE) and not _has_retry(trials, t.number):
            n += 1
    return n


def _has_retry(trials: list[FrozenTrial], number: int) -> bool:
    return any(t.user_attrs.get(ATTR_RETRY_OF) == number for t in trials)


class _Heartbeat:
    """Writes the running trial's heartbeat every ``period_s`` until stopped."""

    def __init__(self, study: optuna.Study, trial_id: int, period_s: float) -> None:
        self._storage, self._trial_id, self._period = study._storage, trial_id, period_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="trial-heartbeat", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self._period):
            with contextlib.suppress(Exception):  # a finished trial, a storage hiccup: next beat retries
                self._storage.set_trial_system_attr(self._trial_id, ATTR_BEAT, time.time())

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


class _Once:
    """Calls ``fn`` the first time only (the worker lock is released by the trial or after it)."""

    def __init__(self, fn: Callable[[], None]) -> None:
        self._fn: Callable[[], None] | None = fn

    def __call__(self) -> None:
        fn, self._fn = self._fn, None
        if fn is not None:
            fn()


class _PgAdvisoryLock:
    """A PostgreSQL advisory lock: makes the trial count exact across machines on a shared study."""

    def __init__(self, url: str, key: str) -> None:
        import sqlalchemy

        self._engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
        self._key = zlib.crc32(key.encode()) & 0x7FFFFFFF
        self._conn: Any = None

    def acquire(self) -> None:
        import sqlalchemy

        self._conn = self._engine.connect()
        self._conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": self._key})

    def release(self) -> None:
        import sqlalchemy

        if self._conn is not None:
            conn, self._conn = self._conn, None
            with contextlib.suppress(Exception):
                conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": self._key})
            conn.close()


class _NoLock:
    def acquire(self) -> None: ...
    def release(self) -> None: ...

    is_locked = False


@dataclass
class StudyRunner:
    """Runs trials of ``study`` with ``objective(trial)`` until the study holds ``n_trials``.

    ``lock_path``: a file lock (journal on this machine) that makes the count exact across workers.
    Failures listed in ``catch`` are recorded as FAIL with their reason and the study goes on.
    """

    study: optuna.Study
    search: SearchConfig
    objective: Callable[[optuna.Trial], float]
    lock_path: Path | str | None = None  # a file (journal) or a postgresql:// URL (advisory lock)
    catch: tuple[type[BaseException], ...] = (PipelineError,)
    on_trial_end: Callable[[optuna.Study, FrozenTrial], None] | None = None
    ran: list[int] = field(default_factory=list)

    def _lock(self) -> Any:
        if self.lock_path is None:
            return _NoLock()
        if isinstance(self.lock_path, str) and self.lock_path.startswith("postgresql"):
            return _PgAdvisoryLock(self.lock_path, f"optuna-study:{self.study.study_name}")
        from filelock import FileLock

        return FileLock(str(self.lock_path), timeout=600)

    def run(self) -> list[int]:
        """Work the study; returns the numbers of the trials this worker ran."""
        lock = self._lock()
        deadline = time.monotonic() + self.search.timeout_s if self.search.timeout_s else None
        while deadline is None or time.monotonic() < deadline:
            lock.acquire()
            release = _Once(lock.release)
            try:
                fail_stale_trials(self.study, self.search)
                trials = self.study.get_trials(deepcopy=False)
                if counted(trials) >= self.search.n_trials:
                    break
                impossible = sum(bool(t.user_attrs.get(ATTR_IMPOSSIBLE)) for t in trials)
                if impossible >= 20 + 5 * self.search.n_trials:
                    raise ConfigError(
                        f"search.space: {impossible} drawn combinations were impossible (see trials.csv for the reasons); "
                        "narrow the space (e.g. choices that fit the frame size and each other)"
                    )
                self.study.optimize(
                    functools.partial(self._trial, release=release),
                    n_trials=1,
                    catch=self.catch,
                    gc_after_trial=self.search.gc_after_trial,
                    callbacks=[self._after],
                )
            finally:
                release()
        return self.ran

    def _trial(self, trial: optuna.Trial, release: Callable[[], None]) -> float:
        storage = self.study._storage
        storage.set_trial_system_attr(trial._trial_id, ATTR_WORKER, worker_id())
        storage.set_trial_system_attr(trial._trial_id, ATTR_BEAT, time.time())
        release()  # the trial is RUNNING in storage: others now count it
        self.ran.append(trial.number)
        with _Heartbeat(self.study, trial._trial_id, self.search.heartbeat_s):
            try:
                return self.objective(trial)
            except optuna.TrialPruned as err:
                if str(err):
                    trial.set_user_attr(ATTR_REASON, str(err))
                raise
            except self.catch as err:
                trial.set_user_attr(ATTR_REASON, f"{type(err).__name__}: {err}")
                log.warning("trial %d failed: %s", trial.number, err)
                raise

    def _after(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if self.on_trial_end is not None:
            self.on_trial_end(study, trial)


@contextlib.contextmanager
def quiet_optuna() -> Iterator[None]:
    """Optuna's own per-trial lines (and tracebacks of failures we record) duplicate ours; keep its errors."""
    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(level)
