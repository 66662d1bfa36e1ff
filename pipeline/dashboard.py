"""optuna-dashboard on the search stage's study storage (journal file or RDB URL).

python -m pipeline.dashboard [--params params.yaml] [--host 127.0.0.1] [--port 8080]    (make dashboard)
"""

from __future__ import annotations

from pipeline import config as config_mod
from pipeline.cli import run_stage, setup_logging, stage_parser
from pipeline.errors import PipelineError
from pipeline.tracking import project_root
from pipeline.tuning import study as study_mod


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser(__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    cfg = config_mod.load(args.params)
    journal = project_root() / study_mod.DEFAULT_JOURNAL
    if not cfg.search.storage and not journal.exists():
        raise PipelineError(
            f"search.storage: no study yet ({journal} does not exist); run `dvc repro search/dvc.yaml` (make search) first"
        )
    storage = study_mod.open_storage(cfg.search, journal)
    from optuna_dashboard import run_server

    print(
        f"optuna-dashboard on {study_mod.describe_storage(cfg.search.storage, journal)}: "
        f"http://{args.host}:{args.port}/dashboard/studies  (study of these params: {study_mod.study_name(cfg)})",
        flush=True,
    )
    run_server(storage, host=args.host, port=args.port)


if __name__ == "__main__":
    raise SystemExit(run_stage(main))
