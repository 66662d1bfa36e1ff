"""What a training checkpoint is made from (params, code, windows data), and when it is reused.

A kept ``last.pt`` is resumed only when all three match the current run; otherwise the phase
trains from scratch and one log line says which part changed. Weights that do not fit the model
are one clear line wherever a checkpoint is loaded. The params the training stages read are
declared in dvc.yaml.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pydantic
import pytest
import torch
import yaml

from pipeline import config
from pipeline.cli import run_stage
from pipeline.errors import DataError
from pipeline.training import checkpoint, fit, load_model, read_checkpoint
from pipeline.training import loop as loop_mod

REPO = Path(__file__).resolve().parents[1]

TINY_MODEL = {
    "embed_dim": 8, "patch_size": 4, "window_size": 2, "depths_down": [1, 1], "depths_up": [1, 1], "heads": [2, 2],
    "drop_path": 0.0, "convlstm": {"hidden": [8]}, "memory": {"slots": 8, "dim": 8}, "dat": {"groups": 1},
}  # fmt: skip
ONE_EPOCH = {"phase1": {"epochs": 1, "max_steps_per_epoch": 2}, "phase2": {"epochs": 1, "max_steps_per_epoch": 2}}


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):  # type: ignore[no-untyped-def]
    """Tiny models: one intra-op thread is as fast and immune to a busy machine."""


@pytest.fixture(scope="module")
def code_snapshot(tmp_path_factory) -> Path:
    return _copy_code(tmp_path_factory.mktemp("code"))


@pytest.fixture(autouse=True)
def _pinned_code(code_snapshot, monkeypatch):  # type: ignore[no-untyped-def]
    """The code hash over a copy of the training source taken once here: an edit of the working tree
    while the tests run does not count as other code. Tests that change code use their own copy."""
    monkeypatch.setattr(checkpoint, "CODE_ROOT", code_snapshot, raising=False)


def _raw(root: Path, out: Path, name: str = "convlstm", windows: Path | None = None, **sections) -> dict:
    train = {**ONE_EPOCH, **sections.pop("train", {})}
    return {
        "data": {
            "root": str(root / "raw"),
            "synthetic": {"n_events": 16, "size": 64, "frames": 25, "events_per_file": 8},
        },
        "windows": {"in_len": 4, "out_len": 4, "stride": 4, "root": str(windows or root / "windows")},
        "model": {"name": name, **TINY_MODEL},
        "train": {
            "device": "cpu",
            "batch_size": 2,
            "threads": 1,
            "checkpoint_dir": str(out),
            "log_every": 2,
            "val_max_batches": 1,
            **train,
        },  # fmt: skip
        "tracking": {"enabled": False},
        **sections,
    }


def _cfg(root: Path, out: Path, **kw) -> config.Config:
    return config.from_dict(_raw(root, out, **kw))


def _make_sample(root: Path, seed: int) -> Path:
    from pipeline.sevir.synthetic import generate
    from pipeline.sevir.windows import write_windows

    cfg = _cfg(root, root / "artifacts")
    generate(cfg.data.root, cfg.data.synthetic, seed=seed, progress=False)
    write_windows(cfg.data.root, cfg.windows, cfg.data.split, stats_path=root / "stats.json")
    return root


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> Path:
    """A tiny SEVIR-format sample chunked into windows: 16 events of 25 frames at 64x64, windows 4 -> 4."""
    return _make_sample(tmp_path_factory.mktemp("sample"), seed=0)


@pytest.fixture(scope="module")
def other_sample(tmp_path_factory) -> Path:
    """The same layout from other events (another generator seed): other windows data, same params."""
    return _make_sample(tmp_path_factory.mktemp("other"), seed=1)


def _copy_windows(src: Path, dest: Path) -> Path:
    """A plain copy (new mtimes), as a DVC checkout or an experiment's temporary copy makes."""
    shutil.copytree(src / "windows", dest, copy_function=shutil.copyfile)
    return dest


def _copy_code(dest: Path) -> Path:
    for rel in ("models", "pipeline/training", "pipeline/scoring"):
        shutil.copytree(REPO / rel, dest / rel, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copyfile(REPO / "pipeline/train.py", dest / "pipeline/train.py")
    return dest


def _fresh_lines(caplog) -> list[str]:
    """The "not resumed" log lines, from "made from" on (the path before it may hold any word)."""
    lines = [r.getMessage() for r in caplog.records if "not resumed" in r.getMessage()]
    return [line[line.index(" was made from ") :] for line in lines]


# ----------------------------------------------------------------------- what a checkpoint records
def test_a_checkpoint_records_params_code_and_data_separately(sample, tmp_path):
    cfg = _cfg(sample, tmp_path)
    result = fit(cfg, 1, tmp_path / "phase1", progress=False)
    state = read_checkpoint(result.last_checkpoint)
    assert set(state["identity"]) == {"params", "code", "data"}
    assert state["identity"] == checkpoint.identity(cfg, 1)
    assert state["config_hash"] == checkpoint.config_hash(cfg, 1) == result.config_hash


def test_the_code_hash_covers_models_training_scoring_and_the_train_entrypoint_only(tmp_path, monkeypatch):
    root = _copy_code(tmp_path / "code")
    (root / "pipeline" / "evaluate.py").write_text("# not training code\n")
    monkeypatch.setattr(checkpoint, "CODE_ROOT", root, raising=False)
    seen = {checkpoint.code_hash()}
    assert checkpoint.code_hash() in seen  # stable
    # the scores' code too: validation scores pick best.pt and are the study's objective
    for rel in ("models/__init__.py", "pipeline/training/loop.py", "pipeline/scoring/scores.py", "pipeline/train.py"):
        with open(root / rel, "a") as fh:
            fh.write("\n# changed\n")
        now = checkpoint.code_hash()
        assert now not in seen, rel
        seen.add(now)
    (root / "models" / "extra.py").write_text("X = 1\n")
    assert checkpoint.code_hash() not in seen  # a new module counts too
    seen.add(checkpoint.code_hash())
    (root / "pipeline" / "evaluate.py").write_text("# edited, still not training code\n")
    (root / "models" / "notes.txt").write_text("not python\n")
    assert checkpoint.code_hash() in seen


@pytest.mark.parametrize("whole_file_limit", [None, 0], ids=["hashed-whole", "sampled"])
def test_the_data_fingerprint_follows_content_not_file_times(
    sample, other_sample, tmp_path, monkeypatch, whole_file_limit
):
    if whole_file_limit is not None:  # large files are not read whole: the sampled digest
        monkeypatch.setattr(checkpoint, "WHOLE_FILE_BYTES", whole_file_limit)
    base = checkpoint.data_fingerprint(sample / "windows")
    copy = _copy_windows(sample, tmp_path / "copy")
    assert checkpoint.data_fingerprint(copy) == base
    shutil.copyfile(other_sample / "windows" / "val.h5", copy / "val.h5")
    assert checkpoint.data_fingerprint(copy) != base
    with pytest.raises(DataError, match=r"train\.h5.*dvc repro chunk"):
        checkpoint.data_fingerprint(tmp_path / "nothing")


# --------------------------------------------------------------------------- reuse or retrain
def test_a_finished_checkpoint_from_other_code_is_retrained_with_one_line_saying_code(
    sample, tmp_path, monkeypatch, caplog
):
    root = _copy_code(tmp_path / "code")
    monkeypatch.setattr(checkpoint, "CODE_ROOT", root, raising=False)
    cfg = _cfg(sample, tmp_path)
    first = fit(cfg, 1, tmp_path / "phase1", progress=False)
    assert read_checkpoint(first.last_checkpoint)["finished"]
    with open(root / "pipeline/training/losses.py", "a") as fh:
        fh.write("\n# a changed loss\n")
    with caplog.at_level(logging.INFO, logger="pipeline.training"):
        again = fit(cfg, 1, tmp_path / "phase1", progress=False)
    assert again.resumed_from_epoch == 0 and len(again.history) == 1
    assert "nothing to train" not in caplog.text
    (line,) = _fresh_lines(caplog)
    assert "code" in line and "params" not in line and "data" not in line and "\n" not in line
    assert read_checkpoint(again.last_checkpoint)["identity"]["code"] == checkpoint.code_hash()


def test_a_finished_checkpoint_from_other_windows_data_is_retrained_with_one_line_saying_data(
    sample, other_sample, tmp_path, caplog
):
    windows = _copy_windows(sample, tmp_path / "windows")
    cfg = _cfg(sample, tmp_path / "artifacts", windows=windows)
    fit(cfg, 1, tmp_path / "artifacts" / "phase1", progress=False)
    shutil.copyfile(other_sample / "windows" / "train.h5", windows / "train.h5")  # rechunked: same params
    with caplog.at_level(logging.INFO, logger="pipeline.training"):
        again = fit(cfg, 1, tmp_path / "artifacts" / "phase1", progress=False)
    assert again.resumed_from_epoch == 0 and len(again.history) == 1
    (line,) = _fresh_lines(caplog)
    assert "data" in line and "params" not in line and "code" not in line


def test_the_validation_scores_params_are_part_of_the_identity(sample, tmp_path, caplog):
    fit(_cfg(sample, tmp_path), 1, tmp_path / "phase1", progress=False)
    for evaluate in ({"thresholds": [16, 74]}, {"pool_sizes": [4]}, {"ssim": False}):
        other = _cfg(sample, tmp_path, evaluate=evaluate)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="pipeline.training"):
            result = fit(other, 1, tmp_path / "phase1", progress=False)
        assert result.resumed_from_epoch == 0, evaluate
        (line,) = _fresh_lines(caplog)
        assert "params" in line and "code" not in line and "data" not in line


def test_the_same_inputs_resume_even_from_a_copy_of_the_windows(sample, tmp_path):
    class Stop(Exception):
        pass

    def stop_after_first(epoch, metrics):
        raise Stop

    windows = _copy_windows(sample, tmp_path / "windows")
    cfg = _cfg(
        sample, tmp_path / "artifacts", windows=windows, train={"phase1": {"epochs": 2, "max_steps_per_epoch": 2}}
    )
    with pytest.raises(Stop):
        fit(cfg, 1, tmp_path / "artifacts" / "phase1", epoch_callback=stop_after_first, progress=False)
    shutil.rmtree(windows)
    _copy_windows(sample, windows)  # checked out again: new files, new mtimes, the same bytes
    result = fit(cfg, 1, tmp_path / "artifacts" / "phase1", progress=False)
    assert result.resumed_from_epoch == 1 and len(result.history) == 2


def test_a_finished_checkpoint_with_renamed_weights_from_other_code_is_retrained_not_a_traceback(
    sample, tmp_path, caplog
):
    cfg = _cfg(sample, tmp_path)
    last = fit(cfg, 1, tmp_path / "phase1", progress=False).last_checkpoint
    state = read_checkpoint(last)
    # what an older version of the model code wrote: a parameter since renamed
    key = next(iter(state["model"]))
    state["model"] = {(f"old_{k}" if k == key else k): v for k, v in state["model"].items()}
    state["identity"] = {**state.get("identity", {}), "code": "0" * 16}
    checkpoint.save_checkpoint(state, last)
    with caplog.at_level(logging.INFO, logger="pipeline.training"):
        result = fit(cfg, 1, tmp_path / "phase1", progress=False)
    assert result.resumed_from_epoch == 0 and len(result.history) == 1
    (line,) = _fresh_lines(caplog)
    assert "code" in line


def test_a_checkpoint_without_an_identity_record_is_retrained(sample, tmp_path, caplog):
    cfg = _cfg(sample, tmp_path)
    last = fit(cfg, 1, tmp_path / "phase1", progress=False).last_checkpoint
    state = read_checkpoint(last)
    state.pop("identity", None)  # an older checkpoint: params-only hash, no record of code or data
    checkpoint.save_checkpoint(state, last)
    with caplog.at_level(logging.INFO, logger="pipeline.training"):
        result = fit(cfg, 1, tmp_path / "phase1", progress=False)
    assert result.resumed_from_epoch == 0
    assert len(_fresh_lines(caplog)) == 1


# ------------------------------------------------------------------------------------ phase 2
def _phase1_then_tamper(sample: Path, tmp_path: Path, change) -> Path:
    cfg = _cfg(sample, tmp_path / "artifacts")
    best = fit(cfg, 1, tmp_path / "artifacts" / "phase1", progress=False).checkpoint
    state = read_checkpoint(best)
    change(state)
    checkpoint.save_checkpoint(state, best)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(_raw(sample, tmp_path / "artifacts"), sort_keys=False))
    return path


def test_phase2_refuses_a_phase1_checkpoint_from_other_code_in_one_line(sample, tmp_path, capsys):
    def other_code(state):
        state["identity"] = {**state.get("identity", {}), "code": "0" * 16}

    params = _phase1_then_tamper(sample, tmp_path, other_code)
    train_main = __import__("pipeline.train", fromlist=["main"]).main
    capsys.readouterr()
    assert run_stage(train_main, ["--phase", "2", "--params", str(params), "--reports", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "phase1/best.pt" in err and "code" in err and "train_phase1" in err
    assert not (tmp_path / "artifacts" / "phase2" / "last.pt").exists()


def test_phase2_from_phase1_weights_that_do_not_fit_is_one_line_naming_the_keys(sample, tmp_path, capsys):
    def renamed(state):
        key = next(iter(state["model"]))
        state["model"] = {(f"old_{k}" if k == key else k): v for k, v in state["model"].items()}

    params = _phase1_then_tamper(sample, tmp_path, renamed)
    key = next(iter(read_checkpoint(tmp_path / "artifacts" / "phase1" / "best.pt")["model"]))
    train_main = __import__("pipeline.train", fromlist=["main"]).main
    capsys.readouterr()
    assert run_stage(train_main, ["--phase", "2", "--params", str(params), "--reports", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "phase1/best.pt" in err and key in err and key.removeprefix("old_") in err
    assert "dvc repro" in err


# ---------------------------------------------------------------------------------- evaluate
@pytest.mark.parametrize("change", ["renamed", "shape"])
def test_loading_weights_that_do_not_fit_the_model_names_what_differs(sample, tmp_path, change):
    cfg = _cfg(sample, tmp_path)
    best = fit(cfg, 1, tmp_path / "phase1", progress=False).checkpoint
    state = read_checkpoint(best)
    key = next(k for k, v in state["model"].items() if v.ndim >= 1)
    if change == "renamed":
        state["model"][f"old_{key}"] = state["model"].pop(key)
    else:
        state["model"][key] = torch.zeros(*state["model"][key].shape[:-1], state["model"][key].shape[-1] + 1)
    checkpoint.save_checkpoint(state, best)
    with pytest.raises(DataError) as err:
        load_model(best, cfg.model)
    msg = str(err.value)
    assert "\n" not in msg and str(best) in msg and key in msg and "dvc repro" in msg
    if change == "shape":
        assert "shape" in msg


# --------------------------------------------------------------------------- dvc.yaml params
def _read_keys(cfg: config.Config, phase: int, out: Path) -> set[str]:
    """The params.yaml keys one ``fit`` reads (leaves, or whole sections it dumps), outside the identity."""
    where: dict[int, str] = {}

    def walk(obj: pydantic.BaseModel, prefix: str) -> None:
        where[id(obj)] = prefix
        for name in type(obj).model_fields:
            value = object.__getattribute__(obj, name)
            if isinstance(value, pydantic.BaseModel):
                walk(value, f"{prefix}.{name}" if prefix else name)

    walk(cfg, "")
    reads: set[str] = set()
    on = [True]

    def getattribute(self, name):  # type: ignore[no-untyped-def]
        value = object.__getattribute__(self, name)
        if on[0] and not name.startswith("_"):
            prefix = where.get(id(self))
            if prefix is not None:
                if name in type(self).model_fields and not isinstance(value, pydantic.BaseModel):
                    reads.add(f"{prefix}.{name}" if prefix else name)
                elif name.startswith("model_dump"):
                    reads.add(prefix)
        return value

    name = "identity" if hasattr(loop_mod, "identity") else "config_hash"
    inner = getattr(loop_mod, name)

    def paused(*args, **kwargs):  # type: ignore[no-untyped-def]
        on[0] = False
        try:
            return inner(*args, **kwargs)
        finally:
            on[0] = True

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loop_mod, name, paused)
        patch.setattr(pydantic.BaseModel, "__getattribute__", getattribute, raising=False)
        fit(cfg, phase, out, progress=False)
    return reads


def _covered(key: str, declared: list[str]) -> bool:
    return any(key == d or key.startswith(f"{d}.") for d in declared)


@pytest.mark.parametrize("name", ["convlstm", "datswinlstm_memory"])
def test_dvc_yaml_declares_every_param_the_training_stages_read(sample, tmp_path, name):
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    cfg = _cfg(sample, tmp_path / "artifacts", name=name,
               train={"phase1": {"epochs": 1, "max_steps_per_epoch": 1}, "phase2": {"epochs": 1, "max_steps_per_epoch": 1}})  # fmt: skip
    as_deps = {"windows.root"}  # interpolated into the stages' deps: DVC hashes the files
    phase1_reads = set()
    for phase in (1, 2):
        reads = _read_keys(cfg, phase, tmp_path / "artifacts" / f"phase{phase}")
        assert {"evaluate.thresholds", "evaluate.pool_sizes", "evaluate.ssim"} <= reads  # validation reads them
        declared = stages[f"train_phase{phase}"]["params"]
        missing = sorted(k for k in reads - as_deps if not _covered(k, declared))
        assert not missing, f"train_phase{phase} reads {missing}, not in its dvc.yaml params"
        if phase == 1:
            phase1_reads = reads
    # the search stage's trials are phase-1 fits with the same validation; the machine settings
    # (device, threads, ...) do not change what a trial computes, windows.* reach it as the windows dep
    runtime = {f"train.{k}" for k in ("device", "compile", "num_workers", "threads", "log_every", "checkpoint_dir")}
    declared = yaml.safe_load((REPO / "search" / "dvc.yaml").read_text())["stages"]["search"][
        "params"
    ]  # its own pipeline
    missing = sorted(k for k in phase1_reads - runtime if not k.startswith("windows.") and not _covered(k, declared))
    assert not missing, f"search trials read {missing}, not in its dvc.yaml params"


def test_the_training_stages_depend_on_all_the_code_their_checkpoints_are_keyed_on():
    """DVC reruns a training stage (and the study) when any of the code in a checkpoint's identity changes,
    so a stale checkpoint is never kept by a pipeline that skipped the stage."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    search = yaml.safe_load((REPO / "search" / "dvc.yaml").read_text())["stages"]["search"]
    for name, stage in (("train_phase1", stages["train_phase1"]), ("train_phase2", stages["train_phase2"])):
        assert set(checkpoint.CODE_PATHS) <= set(stage["deps"]), name
    assert set(checkpoint.CODE_PATHS) - {"pipeline/train.py"} <= set(search["deps"])
