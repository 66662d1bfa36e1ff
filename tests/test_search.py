"""The Optuna study (pipeline.tuning, stage search): space, storage, workers, resume, reports, errors.

Worker processes run the real StudyRunner on a real journal file; their objective is a quick
analytic function of the suggested learning rate (tests/helpers/search_worker.py), since what is
tested here is how a study is shared, resumed and reported. The stage with real phase-1 training
is exercised end to end in test_dvc_experiments.py.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from pipeline import config
from pipeline.errors import ConfigError, PipelineError
from pipeline.tuning import report
from pipeline.tuning import space as space_mod
from pipeline.tuning import study as study_mod

REPO = Path(__file__).resolve().parents[1]

SPACE = [
    {"key": "train.phase1.lr", "type": "logfloat", "low": 1e-4, "high": 1e-2},
    {"key": "model.embed_dim", "type": "categorical", "choices": [32, 48]},
    {"key": "model.depths_down", "type": "categorical", "choices": [[2, 2], [1, 3]]},
]


@pytest.fixture
def study_params(write_params):
    def _make(n_trials: int = 6, **search) -> Path:
        return write_params(
            {
                "search": {
                    "n_trials": n_trials,
                    "pruner": "none",
                    "heartbeat_s": 1,
                    "grace_s": 30,
                    "space": SPACE,
                    **search,
                },
                "tracking": {"enabled": False},
            }
        )

    return _make


def _worker(params: Path, journal: Path, out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.helpers.search_worker", str(params), str(journal), str(out), *extra],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _load(journal: Path, params: Path) -> optuna.Study:
    cfg = config.load(params)
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
    return optuna.load_study(study_name=study_mod.study_name(cfg), storage=storage)


def _stage(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "pipeline.search", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


# ------------------------------------------------------------------------ space
def test_study_name_is_keyed_on_the_training_code_and_the_windows(write_params, tmp_path, monkeypatch):
    """The journal persists across `dvc repro`: a change of models/ or of the windows must start a new study,
    not resume a finished one and report the old code's scores as new."""
    import shutil

    from pipeline.training import checkpoint

    windows = tmp_path / "windows"
    windows.mkdir()
    for name in ("train.h5", "val.h5"):
        (windows / name).write_bytes(b"windows " + name.encode())
    cfg = config.load(write_params({"windows": {"root": str(windows)}}))
    code = tmp_path / "code"
    for rel in checkpoint.CODE_PATHS:
        src = REPO / rel
        if src.is_dir():
            shutil.copytree(src, code / rel, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            (code / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, code / rel)
    monkeypatch.setattr(checkpoint, "CODE_ROOT", code)
    name = study_mod.study_name(cfg)
    assert study_mod.study_name(cfg) == name  # the same params, code and windows resume the same study
    with open(code / "models" / "motion.py", "a") as fh:
        fh.write("\n# a changed model\n")
    changed_code = study_mod.study_name(cfg)
    (windows / "val.h5").write_bytes(b"other windows")
    changed_data = study_mod.study_name(cfg)
    assert len({name, changed_code, changed_data}) == 3


def test_default_space_covers_the_phase1_tuning_guide(repo_root):
    keys = {p.key for p in config.load(repo_root / "params.yaml").search.space}
    guide = {
        "train.phase1.lr",
        "train.phase1.weight_decay",
        "train.phase1.schedule",
        "train.phase1.warmup_frac",
        "model.dropout",
        "model.drop_path",
        "model.embed_dim",
        "model.heads",
        "model.depths_down",
        "model.depths_up",
        "model.window_size",
        "model.memory.slots",
        "train.batch_size",
    }
    assert guide <= keys
    assert any(k.endswith("grad_accum") for k in keys)


def test_default_space_draws_no_impossible_combination(repo_root):
    # grad_accum > 1 with the memory model's align step is never drawn: it is fixed at 1 when align is drawn on
    cfg = config.load(repo_root / "params.yaml")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(60):
        trial = study.ask()
        values = space_mod.suggest(trial, cfg.search.space, cfg)
        try:  # other checks (e.g. heads against embed_dim) may refuse a draw; never grad_accum with align
            space_mod.apply_overrides(cfg, values)
        except ConfigError as err:
            assert "grad_accum" not in str(err), err
        align, accum = values["train.phase1.align"], values["train.phase1.grad_accum"]
        seen.add((align, accum > 1))
        if align:
            assert "train.phase1.grad_accum" not in trial.params
            assert trial.user_attrs[space_mod.FIXED_ATTR] == {"train.phase1.grad_accum": 1}
        study.tell(trial, 0.5)
    assert {(True, False), (False, True)} <= seen and (True, True) not in seen
    # the reports carry the value a trial did not draw, so its exp-run line is complete
    best = study.trials[0]
    assert (
        report.summary(study, cfg.search.space, "x", "val.csi_m")["params"]["train.phase1.grad_accum"]
        == (
            space_mod.decode(best.params, cfg.search.space, best.user_attrs.get(space_mod.FIXED_ATTR))[
                "train.phase1.grad_accum"
            ]
        )
    )


def test_hand_written_grad_accum_with_align_is_still_one_line(write_params):
    params = write_params({"train": {"phase1": {"grad_accum": 2, "align": True}}})
    with pytest.raises(ConfigError) as err:
        config.load(params)
    assert "grad_accum" in str(err.value) and "align" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("entry", "says"),
    [
        ({"key": "model.embed_dimm", "type": "int", "low": 16, "high": 64}, "not a params.yaml key"),
        ({"key": "train.phase1.lr", "type": "logfloat", "low": 1e-2, "high": 1e-4}, "empty range"),
        ({"key": "model.embed_dim", "type": "categorical", "choices": []}, "non-empty 'choices'"),
        ({"key": "model.embed_dim", "type": "categorical", "choices": [32, "wide"]}, "'wide' is not a valid value"),
        ({"key": "train.phase1.lr", "type": "float", "low": -1.0, "high": 1.0}, "greater than 0"),
        ({"key": "model.dropout", "type": "decimal", "low": 0, "high": 1}, "type"),
    ],
)
def test_bad_space_entry_is_one_line_naming_it(study_params, entry, says, tmp_path):
    params = study_params(space=[entry])
    proc = _stage("--params", str(params))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "search.space" in lines[0] and says in lines[0], (
        proc.stderr
    )


def test_suggestions_apply_as_a_validated_config_and_as_an_exp_run_line(study_params):
    cfg = config.load(study_params())
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    trial = study.ask()
    values = space_mod.suggest(trial, cfg.search.space)
    assert isinstance(values["model.depths_down"], list)
    trial_cfg = space_mod.apply_overrides(cfg, values)
    assert trial_cfg.model.depths_down == values["model.depths_down"]
    assert trial_cfg.train.phase1.lr == values["train.phase1.lr"]
    # the printed command parses back to the same values, as dvc's -S does (YAML values)
    argv = shlex.split(space_mod.exp_run_command(values, name="best"))
    assert argv[:5] == ["dvc", "exp", "run", "-n", "best"]
    pairs = dict(arg.split("=", 1) for arg in argv[6::2])
    assert {k: yaml.safe_load(v) for k, v in pairs.items()} == values


def test_impossible_combination_is_a_config_error_naming_keys(study_params):
    cfg = config.load(study_params())
    with pytest.raises(ConfigError, match="search trial"):
        space_mod.apply_overrides(cfg, {"model.embed_dim": 36, "model.heads": [8, 8]})


# ---------------------------------------------------------------------- workers
def test_two_workers_on_one_journal_finish_n_trials_without_duplicates_or_losses(study_params, tmp_path):
    params, journal = study_params(n_trials=8), tmp_path / "study.journal"
    first = _worker(params, journal, tmp_path / "w1.json", "--sleep", "0.4")
    time.sleep(1.0)  # the first worker creates the study; the second joins it
    second = _worker(params, journal, tmp_path / "w2.json", "--sleep", "0.4", "--join")
    for proc in (first, second):
        assert proc.wait(timeout=120) == 0, proc.stderr.read()
    ran = [json.loads((tmp_path / f"w{i}.json").read_text())["ran"] for i in (1, 2)]
    assert ran[0] and ran[1], "both workers ran trials"
    assert not set(ran[0]) & set(ran[1]), "no trial ran twice"
    study = _load(journal, params)
    assert sorted(ran[0] + ran[1]) == [t.number for t in study.trials] == list(range(8))
    assert all(t.state == TrialState.COMPLETE for t in study.trials)


def test_failed_trials_are_recorded_with_their_reason_and_the_study_goes_on(study_params, tmp_path):
    params, journal = study_params(n_trials=6), tmp_path / "study.journal"
    proc = _worker(params, journal, tmp_path / "w.json", "--fail-every", "3")
    assert proc.wait(timeout=120) == 0, proc.stderr.read()
    study = _load(journal, params)
    failed = [t for t in study.trials if t.state == TrialState.FAIL]
    assert [t.number for t in failed] == [2, 5]
    assert all("simulated non-finite loss" in t.user_attrs["fail_reason"] for t in failed)
    assert sum(t.state == TrialState.COMPLETE for t in study.trials) == 4


def test_sigkilled_study_resumes_without_losing_or_repeating_finished_trials(study_params, tmp_path):
    params, journal = study_params(n_trials=5), tmp_path / "study.journal"
    proc = _worker(params, journal, tmp_path / "w1.json", "--sleep", "0.2", "--hang-at", "2")
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:  # kill it mid-trial: trial 2 hangs, trials 0 and 1 are finished
        if journal.exists() and journal.stat().st_size:
            trials = _load(journal, params).trials
            if len(trials) == 3 and trials[2].state == TrialState.RUNNING:
                break
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    before = {t.number: (t.params, t.value) for t in _load(journal, params).trials if t.state == TrialState.COMPLETE}
    assert sorted(before) == [0, 1]

    resumed = _worker(params, journal, tmp_path / "w2.json", "--sleep", "0.2")
    assert resumed.wait(timeout=120) == 0, resumed.stderr.read()
    study = _load(journal, params)
    after = {t.number: (t.params, t.value) for t in study.trials if t.state == TrialState.COMPLETE}
    assert {n: after[n] for n in before} == before, "finished trials are kept as they were"
    assert not set(json.loads((tmp_path / "w2.json").read_text())["ran"]) & set(before), "and not run again"
    (killed,) = [t for t in study.trials if t.state == TrialState.FAIL]
    assert "died" in killed.user_attrs["fail_reason"]
    (retry,) = [t for t in study.trials if t.user_attrs.get("retry_of") == killed.number]
    assert retry.params == killed.params and retry.state == TrialState.COMPLETE
    assert len(after) == 5


def test_stale_trial_of_another_host_is_retried_after_the_grace_period(study_params, tmp_path):
    cfg = config.load(study_params(n_trials=2, grace_s=1))
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(tmp_path / "j.journal")))
    study = study_mod.create_or_load(cfg, storage, "test")
    trial = study.ask()
    space_mod.suggest(trial, cfg.search.space)
    storage.set_trial_system_attr(trial._trial_id, study_mod.ATTR_WORKER, "elsewhere:1")
    storage.set_trial_system_attr(trial._trial_id, study_mod.ATTR_BEAT, time.time() - 5)
    assert study_mod.fail_stale_trials(study, cfg.search) == [trial.number]
    (queued,) = study.get_trials(states=(TrialState.WAITING,))
    assert queued.system_attrs["fixed_params"] == study.trials[0].params  # what the retry will run
    assert "no heartbeat from elsewhere:1" in study.trials[0].user_attrs["fail_reason"]


# ------------------------------------------------------------------------ errors
def test_changed_space_on_a_stored_study_is_one_line(study_params, tmp_path):
    journal = tmp_path / "study.journal"
    proc = _worker(study_params(n_trials=1), journal, tmp_path / "w.json")
    assert proc.wait(timeout=60) == 0, proc.stderr.read()
    changed = study_params(
        n_trials=1, space=[*SPACE[:2], {"key": "model.depths_down", "type": "categorical", "choices": [[2, 2], [2, 4]]}]
    )
    proc = _worker(changed, journal, tmp_path / "w2.json")
    assert proc.wait(timeout=60) == 2
    err = proc.stderr.read().strip().splitlines()
    assert len(err) == 1 and "search.space no longer matches" in err[0] and "~model.depths_down" in err[0]


def test_worker_pointed_at_a_missing_study_is_one_line(study_params, tmp_path):
    params = study_params()
    proc = _stage("--params", str(params), "--worker", "--storage", str(tmp_path / "none.journal"), "--study", "nope")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "study 'nope' not found" in lines[0] and "no studies" in lines[0]


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("postgresql://u:secret@127.0.0.1:9/optuna", "database not reachable"),
        ("mysql://u@127.0.0.1:9/optuna", "driver 'MySQLdb' is not installed"),
        ("ftp://host/x", "unknown URL scheme"),
    ],
)
def test_unusable_study_storage_is_one_line_naming_the_key(study_params, url, says):
    proc = _stage("--params", str(study_params()), "--storage", url)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "search.storage" in lines[0] and says in lines[0], proc.stderr
    assert "secret" not in proc.stderr


# ------------------------------------------------------------------------ report
def test_reports_hold_best_params_trials_plots_and_the_exp_run_line(study_params, tmp_path):
    params, journal = study_params(n_trials=5), tmp_path / "study.journal"
    proc = _worker(params, journal, tmp_path / "w.json", "--fail-every", "5")
    assert proc.wait(timeout=120) == 0, proc.stderr.read()
    cfg, study = config.load(params), _load(journal, params)
    info = report.write_reports(study, cfg.search.space, tmp_path / "reports", str(journal), "val.csi_m")
    best = yaml.safe_load((tmp_path / "reports/best_params.yaml").read_text())
    assert best["best_trial"] == study.best_trial.number and best["best_value"] == pytest.approx(study.best_value)
    assert best["params"]["model.depths_down"] in ([2, 2], [1, 3])
    assert best["command"] == info["command"] and best["command"].startswith("dvc exp run -n ")
    assert best["trials"] == {"complete": 4, "fail": 1}
    rows = (tmp_path / "reports/trials.csv").read_text().splitlines()
    assert rows[0].startswith("number,state,value,duration_s,epochs,reason,train.phase1.lr")
    assert len(rows) == 6 and "simulated non-finite loss" in rows[5]
    for name in ("history.png", "importances.png", "parallel.png"):
        png = (tmp_path / "reports" / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_search_plots_need_enough_trials_and_say_how_many(tmp_path):
    space = [config.SearchParam(**entry) for entry in SPACE]
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=1))
    for i in range(7):
        trial = study.ask()
        space_mod.suggest(trial, space)
        if i % 3 == 2:
            trial.report(0.1 * i, 0)
            study.tell(trial, state=TrialState.PRUNED)
        else:
            study.tell(trial, 0.1 * i)
    captions = []
    import matplotlib.figure

    real = matplotlib.figure.Figure.suptitle

    def spy(fig, text, **kw):
        captions.append(text)
        return real(fig, text, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(matplotlib.figure.Figure, "suptitle", spy)
        report.plots(study, tmp_path, "val.csi_m", space)
    assert any("importances from 5 completed trials" in c for c in captions), captions
    assert any("parallel coordinates (7 trials with a value)" in c for c in captions), captions
    few = optuna.create_study(direction="maximize")
    for i in range(3):
        trial = few.ask()
        space_mod.suggest(trial, space)
        few.tell(trial, 0.1 * i)
    captions.clear()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(matplotlib.figure.Figure, "suptitle", spy)
        report.plots(few, tmp_path, "val.csi_m", space)
    assert any("importances" in c for c in captions)
    assert not any("importances from" in c for c in captions), captions  # a placeholder, not a plot of 3 trials


def test_missing_driver_for_tracking_uri_is_one_line(monkeypatch):
    from pipeline.tracking import check_store_url

    with pytest.raises(
        PipelineError, match=r"tracking.uri = mssql://u:\*\*\*@h/db: database driver 'pyodbc' is not installed"
    ):
        check_store_url("mssql://u:pw@h/db", "tracking.uri")
