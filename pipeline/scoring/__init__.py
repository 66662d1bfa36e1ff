"""Scores, baselines, reports and plots of the evaluation stage (also used by training validation).

``from pipeline.scoring import ScoreAccumulator`` - see :mod:`pipeline.scoring.scores`.
"""

from pipeline.scoring.scores import DEFAULT_THRESHOLDS, ScoreAccumulator, categorical_scores

__all__ = ["DEFAULT_THRESHOLDS", "ScoreAccumulator", "categorical_scores"]
