"""The training engine behind stages train_phase1 / train_phase2.

- :mod:`pipeline.training.loop`: :func:`fit`, the epoch loop (two-phase memory steps, validation,
  early stopping, non-finite stop, MLflow curves)
- :mod:`pipeline.training.checkpoint`: atomic checkpoints, ``read_checkpoint``, ``load_model``,
  the config hash that decides resuming
- :mod:`pipeline.training.data`: loaders, seeded epoch sampler, heavy-rain oversampling, augmentation
- :mod:`pipeline.training.losses`: L1 + lambda MSE, B-MAE/B-MSE, SSIM
- :mod:`pipeline.training.optim`: AdamW parameter groups, lr schedules
- :mod:`pipeline.training.ema`, :mod:`pipeline.training.batch_size`, :mod:`pipeline.training.distributed`
"""

from pipeline.training.checkpoint import load_model, read_checkpoint
from pipeline.training.loop import FitResult, NonFiniteLossError, fit

__all__ = ["FitResult", "NonFiniteLossError", "fit", "load_model", "read_checkpoint"]
