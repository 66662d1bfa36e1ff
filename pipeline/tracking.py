"""MLflow tracking: one parent run per pipeline run, one nested run per stage.

Stages are separate processes (DVC runs each as its own command), so the parent
run is found again by a key: the DVC experiment name under ``dvc exp run``,
otherwise a hash of the git revision and the params file. Every stage run of
one ``dvc repro`` therefore lands under the same parent, and pipelines with
different params sit side by side in the MLflow UI.

Locations are absolute and built from ``DVC_ROOT`` (set by DVC, also inside the
temporary copies of ``dvc exp run --queue``), so a queued run does not write
its store into a directory that is deleted afterwards.

The parent run carries every params.yaml key, flattened (``model.embed_dim``,
``train.phase1.lr``, ...), so the UI's compare view can diff any of them; it is
RUNNING while a stage runs and ends when the last stage ends, so its duration is
the pipeline's. The experiment is tagged as a model-development experiment so
MLflow 3's UI opens it on the runs table, not the GenAI view.

Every run (parent and stage) carries its source: ``mlflow.source.git.commit``,
``mlflow.source.git.branch`` and ``git.branch``, ``mlflow.source.name`` (the stage's module, e.g.
``pipeline/evaluate.py``) and ``mlflow.source.type`` (LOCAL), so the UI's Source column shows
the code (:func:`source_tags`; nothing when the project is not a git checkout). The windows
splits a stage reads are its run's dataset inputs (:func:`log_windows_inputs`).

A local sqlite store is shared by concurrent pipelines (``dvc queue start -j 2``,
several search workers): it runs in WAL mode with a long busy timeout, and the
first creation of its schema is serialised by a file lock.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import logging
import os
import sqlite3
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from pipeline.config import Config
from pipeline.errors import PipelineError

log = logging.getLogger("pipeline.tracking")

KEY_TAG = "pipeline.key"
PARENT_TAG = "pipeline.parent"
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"  # MLflow 3 UI: open on the runs table, not GenAI traces
SQLITE_TIMEOUT_S = 120  # how long a writer waits for another process's lock on a shared sqlite store


def project_root() -> Path:
    """The repository root: ``$DVC_ROOT`` under DVC, else the current directory."""
    return Path(os.environ.get("DVC_ROOT") or Path.cwd()).resolve()


def tracking_uri(uri: str | None) -> str:
    """``tracking.uri`` if set, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<root>/mlflow.db``."""
    if uri:
        if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
            return f"sqlite:///{project_root() / uri[len('sqlite:///') :]}"
        return uri
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root() / 'mlflow.db'}"


def redact(uri: str) -> str:
    """``scheme://user:secret@host/db`` -> ``scheme://user:***@host/db`` (for messages)."""
    if "://" in uri and "@" in uri.split("://", 1)[1].split("/", 1)[0]:
        scheme, rest = uri.split("://", 1)
        creds, host = rest.split("@", 1)
        user = creds.split(":", 1)[0]
        return f"{scheme}://{user}:***@{host}" if ":" in creds else uri
    return uri


_DRIVERS = {  # SQLAlchemy dialect[+driver] -> (module, pip requirement)
    "postgresql": ("psycopg", "psycopg[binary]"),
    "postgresql+psycopg": ("psycopg", "psycopg[binary]"),
    "postgresql+psycopg2": ("psycopg2", "psycopg2-binary"),
    "mysql": ("MySQLdb", "mysqlclient"),
    "mysql+pymysql": ("pymysql", "PyMySQL"),
    "mssql": ("pyodbc", "pyodbc"),
}


def check_store_url(uri: str, key: str, *, connect_timeout_s: float = 5.0) -> None:
    """Fail fast with one line naming ``key`` when a store URL cannot be used.

    Checks the scheme, that the database driver is installed, and that the server answers
    (RDB: one connection with a short timeout; http(s): MLflow's ``/health``). sqlite and
    file stores are checked by their first use. Raises :class:`PipelineError`.
    """
    shown = redact(uri)
    scheme = uri.split("://", 1)[0].lower() if "://" in uri else ""
    if not scheme or scheme == "file" or scheme.startswith("sqlite"):
        return
    if scheme in ("http", "https"):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=connect_timeout_s) as resp:
                resp.read()
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise PipelineError(
                f"{key} = {shown}: MLflow server not reachable ({reason}); start it (see docs/team.md) or fix {key}"
            ) from None
        return
    if scheme in ("databricks", "databricks-uc", "uc"):
        return
    if scheme not in _DRIVERS:
        raise PipelineError(
            f"{key} = {shown}: unknown scheme '{scheme}'; use sqlite:///path.db, postgresql://user:pass@host/db or http://host:port"
        )
    module, requirement = _DRIVERS[scheme]
    try:
        importlib.import_module(module)
    except ImportError:
        raise PipelineError(
            f"{key} = {shown}: database driver '{module}' is not installed; pip install '{requirement}' "
            "(psycopg is pinned in requirements.lock: make install)"
        ) from None
    import sqlalchemy
    from sqlalchemy.exc import SQLAlchemyError

    args = {"connect_timeout": int(max(1, connect_timeout_s))} if scheme.startswith("postgresql") else {}
    try:
        engine = sqlalchemy.create_engine(uri, connect_args=args, poolclass=sqlalchemy.pool.NullPool)
        with engine.connect():
            pass
    except (SQLAlchemyError, OSError) as err:
        first = str(getattr(err, "orig", None) or err).strip().splitlines()[0]
        raise PipelineError(
            f"{key} = {shown}: database not reachable ({first}); start the server or fix {key}"
        ) from None
    except Exception as err:  # noqa: BLE001 - a malformed URL raises plain ArgumentError/ValueError
        raise PipelineError(f"{key} = {shown}: not a usable database URL ({err}); fix {key}") from None


def _sqlite_path(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///"):
        return None
    raw = uri[len("sqlite:///") :].split("?", 1)[0]
    return Path(raw) if raw and raw != ":memory:" else None


def with_busy_timeout(uri: str) -> str:
    """A sqlite URL with a long busy timeout, so concurrent writers wait instead of failing."""
    if _sqlite_path(uri) is None or "timeout=" in uri:
        return uri
    return f"{uri}{'&' if '?' in uri else '?'}timeout={SQLITE_TIMEOUT_S}"


@contextlib.contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """Serialise the first use of a local sqlite store (schema creation) across processes."""
    path = _sqlite_path(uri)
    if path is None:
        yield
        return
    from filelock import FileLock

    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock", timeout=SQLITE_TIMEOUT_S):
        yield


def _enable_wal(uri: str) -> None:
    """WAL lets readers go on while one process writes (persistent in the file; idempotent)."""
    path = _sqlite_path(uri)
    if path is None or not path.exists():
        return
    with contextlib.suppress(sqlite3.Error), contextlib.closing(sqlite3.connect(path, timeout=SQLITE_TIMEOUT_S)) as db:
        if db.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
            db.execute("PRAGMA journal_mode=WAL")


def flatten(prefix: str, value: Any) -> dict[str, str]:
    """Nested params -> ``{"model.embed_dim": "32", ...}`` (MLflow params are flat strings)."""
    if hasattr(value, "model_dump"):
        value = value.model_dump(mode="json")
    if isinstance(value, Mapping):
        out: dict[str, str] = {}
        for key, item in value.items():
            out.update(flatten(f"{prefix}.{key}" if prefix else str(key), item))
        return out
    return {prefix: json.dumps(value) if isinstance(value, list) else str(value)}


def numeric_metrics(stats: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Nested stats -> ``{"train.windows": 144.0, ...}``, keeping numbers only (MLflow metrics are floats)."""
    out: dict[str, float] = {}
    for key, value in stats.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            out.update(numeric_metrics(value, name))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            out[name] = float(value)
    return out


def pipeline_key(cfg: Config) -> str:
    """Identifies one pipeline run across its stage processes."""
    exp = os.environ.get("DVC_EXP_NAME")
    if exp:
        return f"exp:{exp}"
    rev = _git_rev()
    blob = json.dumps(cfg.model_dump(mode="json"), sort_keys=True) + rev
    return "params:" + hashlib.sha1(blob.encode()).hexdigest()[:16]


def _experiment_id(client: Any, name: str) -> str:
    import mlflow

    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(
                name,
                artifact_location=(project_root() / "mlruns").as_uri(),
                tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND},
            )
        except mlflow.exceptions.MlflowException:  # another stage process created it first
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if exp.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
        client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return exp.experiment_id


def runs_table_url(base_url: str, experiment_id: str) -> str:
    """The MLflow 3 UI's runs table of an experiment (not its GenAI traces view)."""
    return f"{base_url.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def _log_params_batched(client: Any, run_id: str, params: Mapping[str, str]) -> None:
    from mlflow.entities import Param

    items = [Param(k, v[:6000]) for k, v in params.items()]
    for start in range(0, len(items), 100):  # MLflow's per-batch limit
        client.log_batch(run_id, params=items[start : start + 100])


def _parent_run_id(client: Any, experiment_id: str, key: str, cfg: Config) -> str:
    """Find (or create, with every params.yaml key) this pipeline's parent run, and mark it RUNNING."""
    found = client.search_runs(
        [experiment_id], filter_string=f"tags.`{KEY_TAG}` = '{key}' and tags.`{PARENT_TAG}` = 'true'", max_results=1
    )
    if found:
        run_id = found[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        return run_id
    name = os.environ.get("DVC_EXP_NAME") or f"pipeline-{key.split(':')[-1][:8]}"
    tags = {KEY_TAG: key, PARENT_TAG: "true"}
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc.exp_name"] = os.environ["DVC_EXP_NAME"]
    tags.update(source_tags("pipeline"))
    run = client.create_run(experiment_id, run_name=name, tags=tags)
    _log_params_batched(client, run.info.run_id, flatten("", cfg))
    return run.info.run_id


def _git(*args: str) -> str:
    """``git <args>`` in the project root, stripped; "" when git or the repository is missing."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(["git", *args], capture_output=True, text=True, cwd=project_root(), timeout=10)
        return done.stdout.strip() if done.returncode == 0 else ""
    return ""


def _git_rev() -> str:
    return _git("rev-parse", "HEAD")


# The module each stage runs (``mlflow.source.name``); stages not listed are ``pipeline/<stage>.py``.
_STAGE_MODULES = {"train_phase1": "pipeline/train.py", "train_phase2": "pipeline/train.py", "pipeline": "dvc.yaml"}


def source_tags(stage: str) -> dict[str, str]:
    """MLflow's source tags for a run of ``stage``: git commit, branch and remote URL (when the project
    is a git checkout), the source name (the stage's module) and type LOCAL."""
    tags = {"mlflow.source.type": "LOCAL", "mlflow.source.name": _STAGE_MODULES.get(stage, f"pipeline/{stage}.py")}
    rev = _git_rev()
    if not rev:
        return tags
    tags["mlflow.source.git.commit"] = rev
    branch = _git("rev-parse", "--abbrev-ref", "HEAD")
    if branch and branch != "HEAD":  # "HEAD": a detached checkout has no branch
        tags["mlflow.source.git.branch"] = tags["git.branch"] = branch
    url = _git("config", "--get", "remote.origin.url")
    if url:
        tags["mlflow.source.git.repoURL"] = redact(url)
    return tags


# ------------------------------------------------------------------ windows splits as dataset inputs
DIGEST_WHOLE_FILE_BYTES = 2 * 2**30  # files up to this size get a full md5 (what DVC records per file)


def file_digest(path: Path) -> str:
    """A content digest of a windows file: its md5 (the hash DVC records for the file) up to
    :data:`DIGEST_WHOLE_FILE_BYTES`, else ``s`` + 31 hex of the training checkpoints' sampled
    fingerprint (layout, small datasets and frames spread over the file). 32 characters either way
    (MLflow keeps at most 36)."""
    path = Path(path)
    if path.stat().st_size <= DIGEST_WHOLE_FILE_BYTES:
        with open(path, "rb") as fh:
            return hashlib.file_digest(fh, "md5").hexdigest()
    from pipeline.training.checkpoint import _file_digest

    return "s" + _file_digest(path)[:31]


def dvc_hash(path: Path) -> str | None:
    """The md5 ``dvc.lock`` records for the output ``path`` (a file or folder: ``<md5>.dir``), or None."""
    import yaml

    lock = project_root() / "dvc.lock"
    try:
        stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
        target = Path(path).resolve()
    except (OSError, yaml.YAMLError, AttributeError):
        return None
    for stage in stages.values():
        for out in (stage or {}).get("outs", []) or []:
            if isinstance(out, dict) and (project_root() / str(out.get("path", ""))).resolve() == target:
                return out.get("md5") or out.get("hash")
    return None


def windows_dataset(path: Path, split: str) -> Any:
    """An ``mlflow.data`` dataset for one windows split file: name ``windows/<split>``, digest
    :func:`file_digest`, source the file path, a tensor schema of ``vil``, and a profile with the
    window and event counts, lengths, and the DVC hash of its folder when ``dvc.lock`` has one."""
    import warnings

    import h5py
    import numpy as np
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.types import Schema, TensorSpec

    path = Path(path).resolve()
    profile: dict[str, Any] = {}
    folder_hash = dvc_hash(path) or dvc_hash(path.parent)
    if folder_hash:
        profile["dvc_md5"] = folder_hash
    schema = None
    with contextlib.suppress(OSError, KeyError), h5py.File(path, "r") as h5:
        vil = h5["vil"]
        profile.update(windows=int(h5["window_event"].shape[0]), events=int(vil.shape[0]))
        profile.update({k: int(h5.attrs[k]) for k in ("in_len", "out_len", "frame_minutes") if k in h5.attrs})
        schema = Schema([TensorSpec(np.dtype(np.uint8), (-1, *vil.shape[1:]), "vil")])
    with warnings.catch_warnings():  # "can be interpreted in multiple ways": a local file either way
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(str(path))

    class _WindowsDataset(MetaDataset):
        @property
        def profile(self) -> Any:
            return json.dumps(profile) if profile else None

        def to_dict(self) -> dict[str, str]:
            out = super().to_dict()
            if profile:
                out["profile"] = json.dumps(profile)
            return out

    return _WindowsDataset(source=source, name=f"windows/{split}", digest=file_digest(path), schema=schema)


WINDOWS_CONTEXTS = {"train": "training", "val": "validation", "test": "test"}


def log_windows_inputs(
    mlflow: Any, windows_root: Path, splits: tuple[str, ...], on_parent: bool = False
) -> dict[str, str]:
    """Log ``<windows_root>/<split>.h5`` of each of ``splits`` as a dataset input of the active run
    (context training / validation / test); returns ``{split: digest}``. Missing files are skipped;
    a no-op without an active run (tracking off). ``on_parent``: the pipeline's parent run gets them
    too, so its row in the runs table (children collapsed) shows the data it was scored on."""
    if (
        not hasattr(mlflow, "active_run")
        or not callable(getattr(mlflow, "log_input", None))
        or mlflow.active_run() is None
    ):
        return {}
    digests: dict[str, str] = {}
    entities = []
    for split in splits:
        path = Path(windows_root) / f"{split}.h5"
        if not path.is_file():
            continue
        dataset = windows_dataset(path, split)
        context = WINDOWS_CONTEXTS.get(split, split)
        mlflow.log_input(dataset, context=context)
        digests[split] = dataset.digest
        entities.append((dataset, context))
    parent = mlflow.get_parent_run(mlflow.active_run().info.run_id) if on_parent and entities else None
    if parent is not None:
        from mlflow import MlflowClient
        from mlflow.entities import DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        inputs = [DatasetInput(d._to_mlflow_entity(), [InputTag(MLFLOW_DATASET_CONTEXT, c)]) for d, c in entities]
        MlflowClient().log_inputs(parent.info.run_id, datasets=inputs)
    return digests


def _end_parent(client: Any, parent: str, status: str) -> None:
    """The parent ends with its latest stage, so its duration spans the pipeline's stages."""
    with contextlib.suppress(Exception):  # never let bookkeeping hide the stage's own outcome
        client.set_terminated(parent, status=status, end_time=int(time.time() * 1000))


def ensure_experiment(cfg: Config) -> tuple[str, str]:
    """The tracking store's URI and this project's experiment id (created and tagged if new)."""
    import mlflow
    from mlflow.tracking import MlflowClient
    from sqlalchemy.exc import SQLAlchemyError

    shown_uri = tracking_uri(cfg.tracking.uri)
    check_store_url(shown_uri, "tracking.uri")
    uri = with_busy_timeout(shown_uri)
    try:
        with _store_lock(uri):
            experiment_id = _experiment_id(MlflowClient(uri), cfg.tracking.experiment)
            _enable_wal(uri)
    except (mlflow.exceptions.MlflowException, OSError, SQLAlchemyError, ImportError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise PipelineError(
            f"tracking.uri = {redact(shown_uri)}: MLflow store not usable ({first}); fix tracking.uri or MLFLOW_TRACKING_URI"
        ) from None
    return uri, experiment_id


class _NoTracking:
    """Stands in for the ``mlflow`` module when ``tracking.enabled`` is false: every call is a no-op."""

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


@contextlib.contextmanager
def stage_run(cfg: Config, stage: str, sections: tuple[str, ...] = ()) -> Iterator[Any]:
    """Open an MLflow run for ``stage`` nested under this pipeline run's parent; yields the ``mlflow`` module.

    The params of ``sections`` (e.g. ``("data", "windows")``) are logged. A failing stage ends its run
    as FAILED. An unreachable tracking store is a :class:`PipelineError` naming ``tracking.uri``.
    """
    if not cfg.tracking.enabled:
        yield _NoTracking()
        return
    import mlflow
    from mlflow.tracking import MlflowClient
    from sqlalchemy.exc import SQLAlchemyError

    shown_uri = tracking_uri(cfg.tracking.uri)
    check_store_url(shown_uri, "tracking.uri")
    uri = with_busy_timeout(shown_uri)
    for noisy in ("alembic", "mlflow.store.db.utils"):  # schema set-up chatter on a new store
        logging.getLogger(noisy).setLevel(logging.WARNING)
    mlflow.set_tracking_uri(uri)
    try:
        with _store_lock(uri):
            client = MlflowClient(uri)
            experiment_id = _experiment_id(client, cfg.tracking.experiment)
            _enable_wal(uri)
        key = pipeline_key(cfg)
        parent = _parent_run_id(client, experiment_id, key, cfg)
    except (mlflow.exceptions.MlflowException, OSError, SQLAlchemyError, ImportError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise PipelineError(
            f"tracking.uri = {redact(shown_uri)}: MLflow store not usable ({first}); fix tracking.uri or MLFLOW_TRACKING_URI"
        ) from None
    tags = {KEY_TAG: key, "pipeline.stage": stage, **source_tags(stage)}
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc.exp_name"] = os.environ["DVC_EXP_NAME"]
    status = "FAILED"
    try:
        with mlflow.start_run(
            experiment_id=experiment_id,
            run_name=stage,
            parent_run_id=parent,
            tags=tags,
            log_system_metrics=cfg.tracking.log_system_metrics,
        ) as run:
            params: dict[str, str] = {}
            for section in sections:
                params.update(flatten(section, getattr(cfg, section)))
            if params:
                mlflow.log_params(params)
            log.info(
                "mlflow: run %s (%s) under parent %s at %s", run.info.run_id[:8], stage, parent[:8], redact(shown_uri)
            )
            log.info("mlflow: runs table %s", runs_table_url("http://127.0.0.1:5000", experiment_id))
            yield mlflow
        status = "FINISHED"
    finally:
        _end_parent(client, parent, status)
