"""Kill -9 at a random moment of each of the six stages, then rerun.

A tiny project (tests/helpers/tiny.py) is run once without interruption (A) and once (B) with every
stage SIGKILLed at a random moment of its run and then rerun with the same command. Checked:

- no finished epoch or trial is lost: the rerun resumes from the epochs the killed run saved, and
  every trial complete at the kill is complete, with the same value, at the end;
- B's final outputs equal A's: the raw sample and the windows byte for byte, the checkpoints' weights,
  optimiser state and per-epoch history exactly (timings aside), the evaluation files byte for byte,
  and every completed trial scores exactly what A scored for the same params.

The moment is drawn from ``KILL_SEED`` (default 16) as a fraction of the stage's uninterrupted time;
a stage that finished before the kill is put back and killed earlier.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch

from pipeline.tuning.study import counted
from tests.helpers import tiny
from tests.helpers.project import copy_project

pytestmark = pytest.mark.slow

EPOCHS = 4
STEPS = 10  # per epoch: long enough that a kill right after an epoch's checkpoint lands inside the next one
TRAIN = {
    "train": {
        "phase1": {"epochs": EPOCHS, "max_steps_per_epoch": STEPS},
        "phase2": {"epochs": EPOCHS, "max_steps_per_epoch": STEPS},
    }
}
TIMING = ("time", "_s", "per_s", "seconds", "gpu_")  # keys whose values are wall or CPU times


def _timing(key: str) -> bool:
    return any(part in key for part in TIMING)


def _same(a: Any, b: Any, where: str = "") -> None:
    """a == b exactly (tensors bit for bit), keys naming timings left out."""
    if isinstance(a, dict):
        keys = {k for k in a if not _timing(str(k))}
        assert keys == {k for k in b if not _timing(str(k))}, where
        for k in keys:
            _same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _same(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, float) and a != a:
        assert b != b, where  # NaN
    else:
        assert a == b, where


def _study(root: Path) -> optuna.Study | None:
    journal = root / "artifacts" / "search" / "optuna.journal"
    if not journal.exists():
        return None
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
    names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
    return optuna.load_study(study_name=names[0], storage=storage) if names else None


def _completed(root: Path) -> dict[int, tuple[str, float]]:
    study = _study(root)
    if study is None:
        return {}
    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    return {t.number: (json.dumps(t.params, sort_keys=True), t.value) for t in done}


def _wait_for_epoch(proc: subprocess.Popen, last: Path, epoch: int, deadline: float) -> None:
    """Until ``last`` holds ``epoch`` epochs (or the stage ends)."""
    end = time.monotonic() + deadline
    while proc.poll() is None and time.monotonic() < end:
        try:
            if last.exists() and _epoch(last) >= epoch:
                return
        except (RuntimeError, EOFError, OSError):
            pass  # replaced while read
        time.sleep(0.02)


def _epoch(path: Path) -> int:
    return int(torch.load(path, weights_only=True)["epoch"]) if path.exists() else 0


def test_each_stage_killed_at_a_random_moment_resumes_to_the_uninterrupted_outputs(tmp_path):
    code = copy_project(tmp_path / "code")  # the code both runs use, whatever happens to the checkout meanwhile
    a, b = tmp_path / "a", tmp_path / "b"
    for root in (a, b):
        root.mkdir()
        tiny.write_params(root, TRAIN)
    took: dict[str, float] = {}
    for stage in tiny.ORDER:
        start = time.monotonic()
        proc = tiny.run_stage(stage, a, code=code)
        assert proc.returncode == 0, proc.stderr[-3000:]
        took[stage] = time.monotonic() - start

    rng = random.Random(int(os.environ.get("KILL_SEED", "16")))
    killed_at: dict[str, float] = {}
    for stage in tiny.ORDER:
        pre = tmp_path / "pre"
        shutil.rmtree(pre, ignore_errors=True)
        shutil.copytree(b, pre, symlinks=True)
        fraction = rng.uniform(0.4, 0.9)
        phase = {"train_phase1": 1, "train_phase2": 2}.get(stage)
        after_epoch = rng.randint(1, EPOCHS - 1)  # training: killed once this epoch is saved, a moment later
        extra = rng.uniform(0.0, 0.05)
        for attempt in range(5):
            delay = fraction * took[stage] * 0.6**attempt
            proc = tiny.run_stage(stage, b, wait=False, code=code)
            for pipe in (proc.stdout, proc.stderr):  # read as it comes: a full pipe must not stall the stage
                threading.Thread(target=pipe.read, daemon=True).start()
            try:
                if phase:
                    _wait_for_epoch(proc, b / "artifacts" / f"phase{phase}" / "last.pt", after_epoch, deadline=60)
                    delay = extra * 0.6**attempt
                proc.wait(timeout=delay)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                assert proc.returncode == -signal.SIGKILL
                killed_at[stage] = delay
                break
            # it finished first: put back what was there before it and kill it earlier
            shutil.rmtree(b)
            shutil.copytree(pre, b, symlinks=True)
        else:
            pytest.fail(f"{stage} always finished before it could be killed")

        last = b / "artifacts" / f"phase{phase}" / "last.pt"
        saved_epochs = _epoch(last) if phase else 0
        saved_history = torch.load(last, weights_only=True)["history"] if saved_epochs else []
        done_before = _completed(b) if stage == "search" else {}

        print(
            f"{stage}: killed at {killed_at[stage]:.1f} s of {took[stage]:.1f} s; saved epochs {saved_epochs}, "
            f"complete trials {sorted(done_before)}"
        )  # shown with pytest -s
        proc = tiny.run_stage(stage, b, code=code)
        assert proc.returncode == 0, f"{stage} rerun after a kill at {killed_at[stage]:.1f} s:\n{proc.stderr[-3000:]}"
        if saved_epochs and saved_epochs < EPOCHS:
            assert f"resuming phase {phase}" in proc.stderr, proc.stderr[-3000:]  # the saved epochs are not redone
        if saved_history:
            _same(saved_history, torch.load(last, weights_only=True)["history"][:saved_epochs], f"{stage} history")
        if done_before:
            after = _completed(b)
            assert all(after.get(n) == v for n, v in done_before.items()), (done_before, after)  # no trial lost

    # the data, byte for byte
    for folder in ("data/raw", "data/windows"):
        assert tiny.snapshot(b / folder) == tiny.snapshot(a / folder), folder
    stats = [json.loads((root / "reports/data/chunk_stats.json").read_text()) for root in (a, b)]
    _same(*stats, "chunk_stats")
    # the checkpoints: weights, optimiser state, history, everything but timings
    for phase in (1, 2):
        for name in ("last.pt", "best.pt"):
            _same(*(torch.load(root / "artifacts" / f"phase{phase}" / name, weights_only=True) for root in (a, b)),
                  f"phase{phase}/{name}")  # fmt: skip
    # the evaluation, byte for byte
    evaluation = ["metrics.json", "summary.md", *(p.relative_to(a / "reports").as_posix()
                                                  for p in (a / "reports/per_lead").iterdir())]  # fmt: skip
    if (a / "reports/scores.json").exists():
        evaluation.append("scores.json")
    for rel in evaluation:
        assert (b / "reports" / rel).read_bytes() == (a / "reports" / rel).read_bytes(), rel
    assert not [p for p in b.rglob(".*") if p.name.endswith((".staging", ".commit", ".old", ".tmp"))]
    # the study: the count reached, every completed trial scored as A scored the same params
    done_a, done_b = _completed(a), _completed(b)
    n_trials = tiny.tiny_params(b)["search"]["n_trials"]
    assert counted(_study(a).trials) == counted(_study(b).trials) == n_trials and done_b
    by_params = {params: value for params, value in done_a.values()}
    for params, value in done_b.values():
        if params in by_params:
            assert value == by_params[params], params
    assert (b / "reports/search/best_params.yaml").exists()
    assert set(killed_at) == set(tiny.ORDER)
