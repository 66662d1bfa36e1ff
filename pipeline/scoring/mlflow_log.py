"""Evaluation results into MLflow: everything in the nested ``evaluate`` run, the headline in the parent.

The nested run gets every number of scores.json as a metric (``model.csi_m``, ``model.csi.16``,
``model_vs_persistence.csi_m_ratio``, ...), the per-lead curves as stepped metrics
(``model.lead.csi_m`` at step = lead time in minutes, the tables' ``lead_min``: 10, 20, ... for
10-minute frames) and the report files as artifacts. The
pipeline's parent run gets the headline numbers (``<forecaster>.csi_m``, ``.hss_m``, ``.mse``,
``.ssim``, ``.csi.<T>``, and the model's CSI-M ratio to each baseline), so the MLflow compare view
lines pipeline runs up side by side. Scores of the val split are prefixed ``val.`` in the parent.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.scoring.reports import VS_PREFIX, comparisons
from pipeline.tracking import numeric_metrics

log = logging.getLogger("pipeline.scoring.mlflow_log")

HEADLINE_KEYS = ("csi_m", "hss_m", "csi_pool16_m", "mse", "ssim")


def headline_metrics(doc: dict[str, Any], split: str = "test") -> dict[str, float]:
    """The numbers the parent run carries (undefined scores are left out)."""
    prefix = "" if split == "test" else f"{split}."
    out: dict[str, float] = {}
    for name, block in doc.items():
        if not isinstance(block, dict) or "csi_m" not in block:
            continue
        for key in HEADLINE_KEYS:
            if block.get(key) is not None:
                out[f"{prefix}{name}.{key}"] = float(block[key])
        for thr, value in block["csi"].items():
            if value is not None:
                out[f"{prefix}{name}.csi.{thr}"] = float(value)
    for base, gaps in comparisons(doc).items():
        if gaps.get("csi_m_ratio") is not None:
            out[f"{prefix}{VS_PREFIX}{base}.csi_m_ratio"] = float(gaps["csi_m_ratio"])
    return out


def log_evaluation(mlflow: Any, doc: dict[str, Any], tables: dict[str, list[dict[str, Any]]], split: str,
                   files: Sequence[Path], reports_dir: Path) -> None:  # fmt: skip
    """Log to the active (nested) run and to its parent; a no-op when tracking is off."""
    run = mlflow.active_run()
    if run is None:  # tracking.enabled: false
        return
    mlflow.log_metrics(numeric_metrics(doc))
    for j, row in enumerate(next(iter(tables.values()))):
        step = int(row["lead_min"])
        stepped = {f"{name}.lead.{metric}": rows[j][name]
                   for metric, rows in tables.items() for name in rows[j] if name != "lead_min"}  # fmt: skip
        mlflow.log_metrics({k: float(v) for k, v in stepped.items() if v is not None}, step=step)
    for path in files:
        rel = Path(path).parent.relative_to(reports_dir) if Path(path).is_relative_to(reports_dir) else Path()
        mlflow.log_artifact(str(path), artifact_path=None if str(rel) == "." else str(rel))
    parent = mlflow.get_parent_run(run.info.run_id)
    if parent is None:
        return
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    now = int(time.time() * 1000)
    headline = headline_metrics(doc, split)
    MlflowClient().log_batch(parent.info.run_id, metrics=[Metric(k, v, now, 0) for k, v in headline.items()])
    log.info("mlflow: %d headline metrics on the parent run %s", len(headline), parent.info.run_id[:8])


# ------------------------------------------------------------------------ the model and the registry
REGISTERED_MODEL = "sevir-nowcaster"
CHAMPION = "champion"
DIGEST_TAG = "windows.test_digest"  # model-version tag: digest of the test windows its CSI-M was scored on
CSI_TAG = "test.csi_m"


def log_model(mlflow: Any, network: Any, model_config: dict[str, Any], data: dict[str, int],
              frame_minutes: int | None, doc: dict[str, Any], split: str, windows_digest: str | None) -> Any:  # fmt: skip
    """Log ``network`` (weights only, CPU, eval mode; built from ``model_config``, the ``model`` section
    as JSON data; trained on ``data``, the checkpoint's data block) as the MLflow model ``model`` of the active run,
    register it as :data:`REGISTERED_MODEL` and move the :data:`CHAMPION` alias when it beats the
    champion (:func:`update_champion`). Returns the new model version, or None when tracking is off.

    The model is a pyfunc from code (:mod:`pipeline.scoring.nowcaster_model`: why not
    ``mlflow.pytorch.log_model``'s pickles is explained there), with a tensor signature inferred
    from one window, ``float32 (1, in_len, 1, H, W)`` on the 0-1 scale, and its forecast.
    """
    if mlflow.active_run() is None:
        return None
    import copy
    import json
    import tempfile

    import torch
    from mlflow.models import infer_signature
    from mlflow.tracking import MlflowClient

    import models
    from pipeline.scoring import nowcaster_model

    network = copy.deepcopy(network).to("cpu").eval()  # the caller's module stays where it is
    example = torch.zeros(1, data["in_len"], 1, data["height"], data["width"])
    example[..., data["height"] // 4 : data["height"] // 2, data["width"] // 4 : data["width"] // 2] = 0.5
    with torch.inference_mode():
        output = network(example, int(data["out_len"]), phase=2).float().numpy()
    example_np = example.numpy()
    signature = infer_signature(example_np, output)
    with tempfile.TemporaryDirectory(prefix="nowcaster-") as tmp:
        weights, config = Path(tmp) / "weights.pt", Path(tmp) / "config.json"
        torch.save({k: v.detach().cpu() for k, v in network.state_dict().items()}, weights)
        config.write_text(json.dumps({"model_config": model_config, "data": dict(data),
                                      "frame_minutes": frame_minutes}, indent=2))  # fmt: skip
        info = mlflow.pyfunc.log_model(
            name="model", python_model=nowcaster_model.__file__,
            artifacts={"weights": str(weights), "config": str(config)},
            code_paths=[str(Path(models.__file__).parent)],
            signature=signature, input_example=example_np, pip_requirements=_requirements(),
        )  # fmt: skip
    client = MlflowClient()
    with _quiet("mlflow.tracking._model_registry"):
        version = mlflow.register_model(info.model_uri, REGISTERED_MODEL)
    score = (doc.get("model") or {}).get("csi_m")
    tags = {"split": split, **({CSI_TAG: str(float(score))} if split == "test" and score is not None else {}),
            **({DIGEST_TAG: windows_digest} if split == "test" and windows_digest else {})}  # fmt: skip
    for key, value in tags.items():
        client.set_model_version_tag(REGISTERED_MODEL, version.version, key, value)
    log.info("mlflow: model %s version %s logged in run %s", REGISTERED_MODEL, version.version,
             mlflow.active_run().info.run_id[:8])  # fmt: skip
    update_champion(client, version.version, score if split == "test" else None, windows_digest)
    return version


def update_champion(client: Any, version: str, csi_m: float | None, digest: str | None) -> bool:
    """Point :data:`CHAMPION` at ``version`` when there is no champion yet, or when its test CSI-M
    beats the champion's on the same test windows (equal :data:`DIGEST_TAG`); otherwise leave the alias
    and log one line saying why. Returns whether the alias moved."""
    from mlflow.exceptions import MlflowException

    if csi_m is None or not digest:
        log.info("mlflow: champion alias left as is: version %s has no test CSI-M (scored on another split)", version)
        return False
    try:
        champion = client.get_model_version_by_alias(REGISTERED_MODEL, CHAMPION)
    except MlflowException:
        champion = None
    if champion is not None:
        theirs, their_digest = champion.tags.get(CSI_TAG), champion.tags.get(DIGEST_TAG)
        if their_digest != digest:
            log.info("mlflow: champion alias left on version %s: it was scored on other test windows "
                     "(digest %s, this run %s); CSI-M not comparable", champion.version, their_digest, digest)  # fmt: skip
            return False
        if theirs is not None and not csi_m > float(theirs):
            log.info("mlflow: champion alias left on version %s: test CSI-M %.4f >= this run's %.4f",
                     champion.version, float(theirs), csi_m)  # fmt: skip
            return False
    client.set_registered_model_alias(REGISTERED_MODEL, CHAMPION, version)
    log.info("mlflow: %s@%s -> version %s (test CSI-M %.4f)", REGISTERED_MODEL, CHAMPION, version, csi_m)
    return True


def _requirements() -> list[str]:
    """The loaded model's pip requirements: the locked versions of what its code imports."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for name in ("mlflow", "torch", "numpy", "pydantic"):
        try:
            out.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            out.append(name)
    return out


class _quiet:
    """Silence one logger's INFO chatter (MLflow prints a line per registration)."""

    def __init__(self, name: str) -> None:
        self.logger = logging.getLogger(name)

    def __enter__(self) -> None:
        self.level = self.logger.level
        self.logger.setLevel(logging.WARNING)

    def __exit__(self, *exc: object) -> None:
        self.logger.setLevel(self.level)
