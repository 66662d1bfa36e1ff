"""Model zoo: networks only (no training loop, files, MLflow or DVC).

``models.build(cfg.model)`` makes the network named by ``model.name``; every
network is a :class:`models.base.Forecaster` called as
``model(x, out_len, memory_x=None, phase=2)``.
"""

from models.registry import available, build, register

__all__ = ["available", "build", "register"]
