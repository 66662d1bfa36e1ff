"""The Optuna phase-1 tuning study behind stage ``search``.

- :mod:`.space`     search.space entries -> trial suggestions -> a validated trial config
- :mod:`.study`     storage (journal file or RDB), study create/load, workers, heartbeats
- :mod:`.objective` one trial = a short phase-1 ``fit`` reporting each epoch, nested MLflow run
- :mod:`.report`    best_params.yaml, trials.csv, plots, the ``dvc exp run -S`` line

Like every library here it receives its config; it never reads params.yaml.
"""

from pipeline.tuning.space import apply_overrides, exp_run_command, suggest
from pipeline.tuning.study import StudyRunner, open_storage, study_name

__all__ = ["StudyRunner", "apply_overrides", "exp_run_command", "open_storage", "study_name", "suggest"]
