"""Bad inputs across the six stages, the way a user gets them wrong.

Each case starts from a copy of a tiny project where every stage has run once (tests/helpers/tiny.py),
spoils one input (a params key, a checkpoint, a windows file, the search space, the storage, an output
folder), runs the stage as ``python -m pipeline.<stage> --params ...`` and asserts: exit code 2, one
``error:`` line on stderr that names the key or the file, no traceback, and no output file changed.
Full disks are simulated in-process (a write raising ENOSPC): CI runs as root, where a chmod does not
make a folder unwritable; a folder under a regular file fails with ENOTDIR even for root.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch

from pipeline import config
from pipeline.cli import run_stage as run_in_process
from pipeline.outputs import OutputSet
from pipeline.preset import merge
from tests.helpers import tiny

MARKER = "pwned-by-a-checkpoint"


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """The six stages run once in a tiny project (about 40 s on 2 cores)."""
    return tiny.build(tmp_path_factory.mktemp("tiny") / "project")


@pytest.fixture
def project(built, tmp_path) -> Path:
    """A private copy of the built project, its params pointing at the copy."""
    root = tmp_path / "project"
    shutil.copytree(built, root, symlinks=True)
    tiny.write_params(root)
    return root


# ------------------------------------------------------------------ spoiling inputs
def _truncate(rel: str) -> Callable[[Path], None]:
    def spoil(root: Path) -> None:
        path = root / rel
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])

    return spoil


class _RunsCode:
    """Unpickling this would run a shell command (what a weights_only load must refuse)."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.target}",))


def _code_pickle(rel: str) -> Callable[[Path], None]:
    def spoil(root: Path) -> None:
        state = torch.load(root / rel, weights_only=True)
        state["model"] = _RunsCode(str(root / MARKER))
        torch.save(state, root / rel)

    return spoil


def _copy(src: str, dst: str) -> Callable[[Path], None]:
    return lambda root: shutil.copyfile(root / src, root / dst)


def _rewrite_vil(rel: str, make: Callable[[np.ndarray], np.ndarray]) -> Callable[[Path], None]:
    def spoil(root: Path) -> None:
        with h5py.File(root / rel, "r+") as h5:
            new = make(h5["vil"][()])
            del h5["vil"]
            h5.create_dataset("vil", data=new)

    return spoil


def _set_attr(rel: str, **attrs: Any) -> Callable[[Path], None]:
    def spoil(root: Path) -> None:
        with h5py.File(root / rel, "r+") as h5:
            h5.attrs.update(attrs)

    return spoil


def _file_at(rel: str) -> Callable[[Path], None]:
    """A regular file where a folder's parent should be: writes under it fail with ENOTDIR, even as root."""
    return lambda root: (root / rel).write_text("a file, not a folder\n")


def _write(rel: str, text: str) -> Callable[[Path], None]:
    return lambda root: (root / rel).write_text(text)


# ------------------------------------------------------------------ the cases
# (id, stage, params overrides, spoil, extra args, what the line must name)
SPACE_LR = {"key": "train.phase1.lr", "type": "logfloat", "low": 1.0e-4, "high": 3.0e-3}
CASES: list[tuple[str, str, dict, Callable[[Path], None] | None, tuple[str, ...], list[str]]] = [
    # keys that name a metric, a lead, a threshold or a forecaster: refused when params load
    (
        "best_key-phase1",
        "train_phase1",
        {"train": {"phase1": {"best_key": "val.nosuch"}}},
        None,
        (),
        ["train.phase1.best_key", "val.csi_m"],
    ),
    (
        "best_key-phase2",
        "train_phase2",
        {"train": {"phase2": {"best_key": "val.csi.999"}}},
        None,
        (),
        ["train.phase2.best_key", "val.csi.16"],
    ),
    (
        "best_key-ssim-off",
        "train_phase1",
        {"evaluate": {"ssim": False}, "train": {"phase1": {"best_key": "val.ssim"}}},
        None,
        (),
        ["train.phase1.best_key", "val.loss"],
    ),
    (
        "best_key-memory-loss-of-convlstm",
        "train_phase1",
        {"train": {"phase1": {"best_key": "train.loss_align"}}},
        None,
        (),
        ["train.phase1.best_key", "train.loss"],
    ),
    ("search-metric", "search", {"search": {"metric": "val.nosuch"}}, None, (), ["search.metric", "val.csi_m"]),
    (
        "example_leads-past-out_len",
        "evaluate",
        {"evaluate": {"example_leads": [1, 40]}},
        None,
        (),
        ["evaluate.example_leads", "windows.out_len (4)"],
    ),
    ("example_leads-zero", "evaluate", {"evaluate": {"example_leads": [0, 2]}}, None, (), ["evaluate.example_leads"]),
    ("thresholds-unsorted", "evaluate", {"evaluate": {"thresholds": [74, 16]}}, None, (), ["evaluate.thresholds"]),
    ("thresholds-over-255", "train_phase1", {"evaluate": {"thresholds": [16, 300]}}, None, (), ["evaluate.thresholds"]),
    (
        "baseline-unknown",
        "evaluate",
        {"evaluate": {"baselines": ["persistence", "climatology"]}},
        None,
        (),
        ["evaluate.baselines", "optical_flow"],
    ),
    (
        "baseline-twice",
        "evaluate",
        {"evaluate": {"baselines": ["persistence", "persistence"]}},
        None,
        (),
        ["evaluate.baselines"],
    ),
    ("evaluate-split", "evaluate", {"evaluate": {"split": "train"}}, None, (), ["evaluate.split"]),
    # params at large
    ("data-source", "fetch", {"data": {"source": "ftp"}}, None, (), ["data.source"]),
    ("synthetic-n_events", "fetch", {"data": {"synthetic": {"n_events": 0}}}, None, (), ["data.synthetic.n_events"]),
    ("unknown-key", "chunk", {"windows": {"strid": 4}}, None, (), ["windows.strid", "unknown key"]),
    ("windows-too-long", "chunk", {"windows": {"in_len": 30, "out_len": 30}}, None, (), ["exceeds the 49 frames"]),
    (
        "windows-longer-than-sample",
        "chunk",
        {"windows": {"in_len": 20, "out_len": 20}},
        None,
        (),
        ["data.synthetic.frames = 25", "windows.in_len"],
    ),
    ("downsample", "chunk", {"windows": {"downsample": 3}}, None, (), ["windows.downsample"]),
    ("params-not-yaml", "train_phase1", {}, _write("params.yaml", "train: [unclosed\n"), (), ["params.yaml", "YAML"]),
    # checkpoints
    (
        "ckpt-truncated-phase1",
        "train_phase2",
        {},
        _truncate("artifacts/phase1/best.pt"),
        (),
        ["artifacts/phase1/best.pt", "corrupt"],
    ),
    (
        "ckpt-truncated-phase2",
        "evaluate",
        {},
        _truncate("artifacts/phase2/best.pt"),
        (),
        ["artifacts/phase2/best.pt", "corrupt"],
    ),
    (
        "ckpt-truncated-resume",
        "train_phase1",
        {},
        _truncate("artifacts/phase1/last.pt"),
        (),
        ["artifacts/phase1/last.pt", "corrupt"],
    ),
    (
        "ckpt-runs-code-phase1",
        "train_phase2",
        {},
        _code_pickle("artifacts/phase1/best.pt"),
        (),
        ["artifacts/phase1/best.pt"],
    ),
    (
        "ckpt-runs-code-phase2",
        "evaluate",
        {},
        _code_pickle("artifacts/phase2/best.pt"),
        (),
        ["artifacts/phase2/best.pt"],
    ),
    (
        "ckpt-other-model-phase2",
        "evaluate",
        {"model": {"convlstm": {"hidden": [6]}}},
        None,
        (),
        ["artifacts/phase2/best.pt", "model.convlstm.hidden"],
    ),
    (
        "ckpt-other-model-phase1",
        "train_phase2",
        {"model": {"convlstm": {"hidden": [6]}}},
        None,
        (),
        ["artifacts/phase1/best.pt", "model.*"],
    ),
    (
        "ckpt-other-phase-for-phase2",
        "train_phase2",
        {},
        _copy("artifacts/phase2/best.pt", "artifacts/phase1/best.pt"),
        (),
        ["artifacts/phase1/best.pt", "phase-2 checkpoint"],
    ),
    (
        "ckpt-other-phase-for-evaluate",
        "evaluate",
        {},
        _copy("artifacts/phase1/best.pt", "artifacts/phase2/best.pt"),
        (),
        ["artifacts/phase2/best.pt", "phase-1 checkpoint"],
    ),
    (
        "ckpt-missing",
        "evaluate",
        {},
        lambda root: (root / "artifacts/phase2/best.pt").unlink(),
        (),
        ["artifacts/phase2/best.pt", "train_phase2"],
    ),
    # windows files
    ("windows-truncated-train", "train_phase1", {}, _truncate("data/windows/train.h5"), (), ["data/windows/train.h5"]),
    ("windows-truncated-test", "evaluate", {}, _truncate("data/windows/test.h5"), (), ["data/windows/test.h5"]),
    (
        "windows-shape-train",
        "train_phase1",
        {},
        _rewrite_vil("data/windows/train.h5", lambda v: v[:, :, :16, :16]),
        (),
        ["data/windows/train.h5", "16x16"],
    ),
    (
        "windows-shape-test",
        "evaluate",
        {},
        _rewrite_vil("data/windows/test.h5", lambda v: v[:, :, :16, :16]),
        (),
        ["data/windows/test.h5", "16x16"],
    ),
    (
        "windows-dtype-train",
        "train_phase1",
        {},
        _rewrite_vil("data/windows/train.h5", lambda v: v.astype(np.float32)),
        (),
        ["data/windows/train.h5", "float32"],
    ),
    (
        "windows-dtype-test",
        "evaluate",
        {},
        _rewrite_vil("data/windows/test.h5", lambda v: v.astype(np.float32)),
        (),
        ["data/windows/test.h5", "float32"],
    ),
    (
        "windows-frame-step-train",
        "train_phase1",
        {},
        _set_attr("data/windows/train.h5", frame_step=2, frame_minutes=10),
        (),
        ["data/windows/train.h5", "windows.frame_step"],
    ),
    (
        "windows-frame-step-test",
        "evaluate",
        {},
        _set_attr("data/windows/test.h5", frame_step=2, frame_minutes=10),
        (),
        ["data/windows/test.h5", "windows.frame_step"],
    ),
    (
        "windows-missing",
        "train_phase1",
        {},
        lambda root: (root / "data/windows/train.h5").unlink(),
        (),
        ["data/windows/train.h5", "chunk"],
    ),
    # raw data
    ("raw-catalog-missing", "chunk", {}, lambda root: (root / "data/raw/CATALOG.csv").unlink(), (), ["CATALOG.csv"]),
    (
        "raw-h5-truncated",
        "chunk",
        {},
        lambda root: _truncate(next(p.relative_to(root).as_posix() for p in sorted((root / "data/raw").rglob("*.h5"))))(
            root
        ),
        (),
        ["data/raw/", ".h5"],
    ),
    (
        "local-path-missing",
        "fetch",
        {"data": {"source": "local", "local": {"path": "/nonexistent/sevir"}}},
        None,
        (),
        ["/nonexistent/sevir"],
    ),
    # the search space
    (
        "space-unknown-key",
        "search",
        {"search": {"space": [SPACE_LR, {"key": "model.nosuch", "type": "float", "low": 0.0, "high": 1.0}]}},
        None,
        (),
        ["search.space[1]", "model.nosuch"],
    ),
    (
        "space-empty-range",
        "search",
        {"search": {"space": [{**SPACE_LR, "low": 1.0e-3, "high": 1.0e-3}]}},
        None,
        (),
        ["search.space", "train.phase1.lr", "empty range"],
    ),
    (
        "space-log-from-0",
        "search",
        {"search": {"space": [{**SPACE_LR, "low": 0.0}]}},
        None,
        (),
        ["search.space", "train.phase1.lr", "logfloat"],
    ),
    (
        "space-categorical-type",
        "search",
        {"search": {"space": [{"key": "model.embed_dim", "type": "categorical", "choices": [8, "big"]}]}},
        None,
        (),
        ["search.space", "model.embed_dim", "'big'"],
    ),
    (
        "space-not-tunable",
        "search",
        {"search": {"space": [{"key": "data.seed", "type": "int", "low": 0, "high": 3}]}},
        None,
        (),
        ["search.space", "data.seed"],
    ),
    # storage and output folders
    (
        "storage-postgres-unreachable",
        "search",
        {"search": {"storage": "postgresql://u:p@127.0.0.1:1/x"}},
        None,
        (),
        ["search.storage", "127.0.0.1:1"],
    ),
    ("storage-unknown-scheme", "search", {"search": {"storage": "ftp://host/journal"}}, None, (), ["search.storage"]),
    (
        "storage-journal-unusable",
        "search",
        {"search": {"storage": "{root}/blocker/optuna.journal"}},
        _file_at("blocker"),
        (),
        ["blocker", "search.storage"],
    ),
    ("search-out-unwritable", "search", {}, _file_at("blocker"), ("--out", "blocker/search"), ["blocker", "--out"]),
    (
        "checkpoint-dir-unwritable",
        "train_phase1",
        {"train": {"checkpoint_dir": "{root}/blocker/artifacts"}},
        _file_at("blocker"),
        (),
        ["blocker", "train.checkpoint_dir"],
    ),
    (
        "train-reports-unwritable",
        "train_phase1",
        {},
        _file_at("blocker"),
        ("--reports", "blocker/reports"),
        ["blocker", "--reports"],
    ),
    (
        "evaluate-reports-unwritable",
        "evaluate",
        {"evaluate": {"reports_dir": "{root}/blocker/reports"}},
        _file_at("blocker"),
        (),
        ["blocker", "evaluate.reports_dir"],
    ),
    (
        "windows-root-unwritable",
        "chunk",
        {"windows": {"root": "{root}/blocker/windows"}},
        _file_at("blocker"),
        (),
        ["blocker", "windows.root"],
    ),
    (
        "chunk-stats-unwritable",
        "chunk",
        {},
        _file_at("blocker"),
        ("--stats", "blocker/chunk_stats.json"),
        ["blocker", "--stats"],
    ),
    (
        "fetch-root-unwritable",
        "fetch",
        {"data": {"root": "{root}/blocker/raw"}},
        _file_at("blocker"),
        (),
        ["blocker", "data.root"],
    ),
    (
        "tracking-unreachable",
        "train_phase1",
        {"tracking": {"enabled": True, "uri": "postgresql://u:p@127.0.0.1:1/x"}},
        None,
        (),
        ["tracking.uri", "127.0.0.1:1"],
    ),
]


def _fill(tree: Any, root: Path) -> Any:
    if isinstance(tree, dict):
        return {k: _fill(v, root) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_fill(v, root) for v in tree]
    return tree.replace("{root}", str(root)) if isinstance(tree, str) else tree


def test_there_are_at_least_40_cases_over_the_six_stages():
    assert len(CASES) >= 40 and len({c[0] for c in CASES}) == len(CASES)
    assert {c[1] for c in CASES} == set(tiny.STAGES)


@pytest.mark.parametrize(("stage", "overrides", "spoil", "extra", "names"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])  # fmt: skip
def test_a_bad_input_is_one_line_exit_2_and_changes_no_output(project, stage, overrides, spoil, extra, names):
    params = (
        tiny.write_params(project, _fill(overrides, project), name="params.yaml")
        if overrides
        else project / "params.yaml"
    )
    if spoil is not None:
        spoil(project)
    before = tiny.snapshot(project)
    proc = tiny.run_stage(stage, project, params, *extra, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and proc.stderr.rstrip().endswith(errors[0]), proc.stderr[-3000:]
    for name in names:
        assert name in errors[0], (name, errors[0])
    assert tiny.snapshot(project) == before
    assert not (project / MARKER).exists()  # no checkpoint ran code
    leftovers = [p for p in project.rglob(".*") if p.name.endswith((".tmp", ".staging", ".commit", ".old"))]
    assert not leftovers


# ------------------------------------------------------------------ checked at load
def test_every_name_a_best_key_may_take_is_logged_by_an_epoch(tmp_path, one_torch_thread):
    """The allowed set of config.epoch_metric_keys is what training really logs (val.* and train.*)."""
    from pipeline.training import fit

    for name, phase in (("convlstm", 1), ("datswinlstm_memory", 1), ("datswinlstm_memory", 2)):
        raw = tiny.tiny_params(tmp_path / "w")
        raw["windows"]["root"] = str(_windows(tmp_path))
        raw["model"]["name"] = name
        raw["train"]["phase1"].update(epochs=1, max_steps_per_epoch=1)
        raw["train"]["phase2"].update(epochs=1, max_steps_per_epoch=1)
        raw["train"]["checkpoint_dir"] = str(tmp_path / name)
        cfg = config.from_dict(raw)
        if phase == 2:
            fit(cfg, 1, tmp_path / name / "phase1", progress=False)
        logged = fit(cfg, phase, tmp_path / name / f"phase{phase}", progress=False).history[0]
        assert set(config.epoch_metric_keys(cfg, phase)) == {k for k in logged if k.startswith(("val.", "train."))}
        assert set(config.search_metric_keys(cfg)) <= set(logged)


_WINDOWS: dict[str, Path] = {}


def _windows(tmp_path: Path) -> Path:
    """The windows of a tiny project (chunked once per session)."""
    if "root" not in _WINDOWS or not _WINDOWS["root"].exists():
        from pipeline.sevir.synthetic import generate
        from pipeline.sevir.windows import write_windows

        root = tmp_path / "windows-project"
        cfg = config.from_dict(tiny.tiny_params(root))
        generate(cfg.data.root, cfg.data.synthetic, seed=0, progress=False)
        write_windows(cfg.data.root, cfg.windows, cfg.data.split, stats_path=root / "stats.json", progress=False)
        _WINDOWS["root"] = cfg.windows.root
    return _WINDOWS["root"]


def test_the_bad_keys_are_refused_before_any_data_is_read(tmp_path):
    """Loading the params alone refuses them: no stage gets as far as opening a file."""
    for overrides, key in (({"train": {"phase1": {"best_key": "val.nosuch"}}}, "train.phase1.best_key"),
                           ({"search": {"metric": "val.nosuch"}}, "search.metric"),
                           ({"evaluate": {"example_leads": [1, 40]}}, "evaluate.example_leads")):  # fmt: skip
        raw = tiny.tiny_params(tmp_path / "nowhere")
        with pytest.raises(config.ConfigError, match=key.replace(".", r"\.")) as err:
            config.from_dict(merge(raw, overrides))
        assert "\n" not in str(err.value) and "allowed" in str(err.value)
    assert not (tmp_path / "nowhere").exists()


def test_default_example_leads_follow_out_len():
    assert config.from_dict({}).evaluate.gallery_leads(12) == [1, 3, 6, 12]
    assert config.from_dict({"windows": {"in_len": 7, "out_len": 6}}).evaluate.gallery_leads(6) == [1, 3, 6]
    assert config.from_dict({"evaluate": {"example_leads": [2]}}).evaluate.gallery_leads(6) == [2]


# ------------------------------------------------------------------ full disk, in process
def _enospc_after(n_bytes: int):
    """A replacement for ``open`` whose files refuse writes (ENOSPC) past ``n_bytes`` written in all."""
    import builtins
    import io

    written = [0]
    real_open = builtins.open

    class Full(io.FileIO):
        def write(self, data):  # type: ignore[no-untyped-def]
            written[0] += len(data)
            if written[0] > n_bytes:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return super().write(data)

    def fake_open(file, mode="r", *args, **kwargs):  # type: ignore[no-untyped-def]
        if "w" in mode and "b" in mode:
            return io.BufferedWriter(Full(file, "w"))
        return real_open(file, mode, *args, **kwargs)

    return fake_open


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_a_full_disk_while_a_checkpoint_is_written_is_one_line_and_keeps_the_last_one(project, monkeypatch, capsys):
    from pipeline import train

    params = tiny.write_params(project, {"train": {"phase1": {"epochs": 3}}})
    ckpts = project / "artifacts" / "phase1"
    before = {p.name: p.read_bytes() for p in ckpts.iterdir()}
    monkeypatch.chdir(project)
    monkeypatch.setattr("pipeline.training.checkpoint.open", _enospc_after(4096), raising=False)
    assert run_in_process(train.main, ["--phase", "1", "--params", str(params)]) == 2
    line = _one_error_line(capsys)
    assert "last.pt" in line and "No space left on device" in line and "train.checkpoint_dir" in line, line
    assert {p.name: p.read_bytes() for p in ckpts.iterdir()} == before  # the epoch-2 checkpoints, no temp file


def test_a_full_disk_while_training_writes_its_reports_keeps_the_previous_ones(project, monkeypatch, capsys):
    from pipeline import train
    from pipeline.training import report

    params = tiny.write_params(project, {"train": {"phase1": {"epochs": 3}}})
    before = tiny.snapshot(project / "reports")
    real, calls = report._atomic_write, [0]

    def full(path, data):  # type: ignore[no-untyped-def]
        calls[0] += 1
        if calls[0] > 2:  # two of the four files go in, the third finds the disk full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(path, data)

    monkeypatch.setattr(report, "_atomic_write", full)
    monkeypatch.chdir(project)
    assert run_in_process(train.main, ["--phase", "1", "--params", str(params)]) == 2
    line = _one_error_line(capsys)
    assert "No space left on device" in line and "--reports" in line, line
    assert tiny.snapshot(project / "reports") == before  # the previous four files, not two new and two old
    assert not list((project / "reports").glob(".train_phase1.*"))


def test_a_full_disk_while_evaluate_writes_keeps_the_previous_reports(project, monkeypatch, capsys):
    from pipeline import evaluate
    from pipeline.scoring import reports

    before = tiny.snapshot(project / "reports")
    real = reports.write_atomic
    calls = [0]

    def full(path, data):  # type: ignore[no-untyped-def]
        calls[0] += 1
        if calls[0] > 1:  # the first report file goes in, the next finds the disk full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(path, data)

    monkeypatch.setattr(reports, "write_atomic", full)
    monkeypatch.chdir(project)
    assert run_in_process(evaluate.main, ["--params", str(project / "params.yaml")]) == 2
    line = _one_error_line(capsys)
    assert "No space left on device" in line and "evaluate.reports_dir" in line, line
    assert tiny.snapshot(project / "reports") == before
    assert not list((project / "reports").glob(".evaluate.*"))


def test_a_full_disk_while_search_writes_its_reports_keeps_the_previous_ones(project, monkeypatch, capsys):
    from pipeline import search
    from pipeline.tuning import report

    before = tiny.snapshot(project / "reports" / "search")

    def full(path, data):  # type: ignore[no-untyped-def]
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(report, "_atomic_write", full)
    monkeypatch.chdir(project)
    assert run_in_process(search.main, ["--params", str(project / "params.yaml")]) == 2
    line = _one_error_line(capsys)
    assert "No space left on device" in line and "--out" in line, line
    assert tiny.snapshot(project / "reports" / "search") == before
    assert not list((project / "reports").glob(".search.*"))


def test_a_full_disk_on_the_search_journal_is_one_line_naming_the_storage(project, monkeypatch, capsys):
    import optuna

    from pipeline import search

    def full(self, logs):  # type: ignore[no-untyped-def]
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self._file_path)

    monkeypatch.setattr(optuna.storages.journal.JournalFileBackend, "append_logs", full)
    params = tiny.write_params(project, {"search": {"n_trials": 3}})
    monkeypatch.chdir(project)
    before = tiny.snapshot(project / "reports" / "search")
    assert run_in_process(search.main, ["--params", str(params)]) == 2
    line = _one_error_line(capsys)
    assert "optuna.journal" in line and "search.storage" in line and "No space left" in line, line
    assert tiny.snapshot(project / "reports" / "search") == before


def test_a_full_disk_during_fetch_is_one_line_and_keeps_the_previous_sample(project, monkeypatch, capsys):
    from pipeline import fetch
    from pipeline.sevir import synthetic

    before = tiny.snapshot(project / "data" / "raw")
    real = synthetic.h5py.File
    opened = [0]

    def full(path, mode="r", *args, **kwargs):  # type: ignore[no-untyped-def]
        if mode == "w":
            opened[0] += 1
            if opened[0] > 1:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(path, mode, *args, **kwargs)

    monkeypatch.setattr(synthetic.h5py, "File", full)
    params = tiny.write_params(project, {"data": {"seed": 1}})  # a new sample: fetch writes
    monkeypatch.chdir(project)
    assert run_in_process(fetch.main, ["--params", str(params)]) == 2
    line = _one_error_line(capsys)
    assert "No space left on device" in line and "data.root" in line, line
    assert tiny.snapshot(project / "data" / "raw") == before


def test_an_mlflow_artifact_upload_that_fails_is_a_warning_and_training_goes_on(project, monkeypatch, capsys):
    import mlflow

    from pipeline import train

    params = tiny.write_params(project, {"tracking": {"enabled": True}, "train": {"phase1": {"epochs": 3}}})

    def full(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "mlruns/artifacts")

    monkeypatch.setattr(mlflow, "log_artifact", full)
    monkeypatch.setattr(mlflow, "log_artifacts", full)
    monkeypatch.chdir(project)
    assert run_in_process(train.main, ["--phase", "1", "--params", str(params)]) == 0
    err = capsys.readouterr().err
    warned = [line for line in err.splitlines() if "WARNING" in line and "MLflow" in line]
    assert warned and all("No space left on device" in line for line in warned), err[-2000:]
    assert "error:" not in err and "Traceback" not in err
    assert json.loads((project / "reports" / "train_phase1.json").read_text())["epochs"] == 3


# ------------------------------------------------------------------ outputs replaced as a set
def _set(parent: Path, content: str) -> None:
    (parent / "per_lead").mkdir(parents=True, exist_ok=True)
    (parent / "per_lead" / "a.csv").write_text(content)
    (parent / "summary.md").write_text(content)
    (parent / "metrics.json").write_text(content)


def _read_set(parent: Path) -> dict[str, str]:
    return {p.relative_to(parent).as_posix(): p.read_text() for p in sorted(parent.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(parent).parts)}  # fmt: skip


NAMES = ["per_lead", "gone", "summary.md", "metrics.json"]


@pytest.mark.parametrize("stop_after", range(0, 9))
def test_a_set_stopped_at_any_rename_is_the_old_or_the_new_one_after_recovery(tmp_path, monkeypatch, stop_after):
    parent = tmp_path / "reports"
    _set(parent, "old")
    (parent / "gone").write_text("old")  # in the old set, not in the new one
    (parent / "other.txt").write_text("not ours")
    real, renames = os.replace, [0]

    def stopping(src, dst):  # type: ignore[no-untyped-def]
        renames[0] += 1
        if renames[0] > stop_after:
            raise KeyboardInterrupt  # stands in for a kill between two renames
        real(src, dst)

    monkeypatch.setattr(os, "replace", stopping)
    outputs = OutputSet(parent, NAMES, "evaluate", "evaluate.reports_dir")
    with pytest.raises(KeyboardInterrupt) if stop_after < 8 else _no_raise():
        with outputs as staged:
            _set(staged, "new")
    monkeypatch.setattr(os, "replace", real)
    OutputSet(parent, NAMES, "evaluate", "evaluate.reports_dir").recover()
    old = {"gone": "old", "metrics.json": "old", "other.txt": "not ours", "per_lead/a.csv": "old", "summary.md": "old"}
    new = {"metrics.json": "new", "other.txt": "not ours", "per_lead/a.csv": "new", "summary.md": "new"}
    assert _read_set(parent) in (old, new)
    assert _read_set(parent) == (old if stop_after == 0 else new)  # the first rename is the commit point
    assert sorted(p.name for p in parent.iterdir() if p.name.startswith(".")) == []


class _no_raise:
    def __enter__(self):  # type: ignore[no-untyped-def]
        return self

    def __exit__(self, *exc):  # type: ignore[no-untyped-def]
        return False
