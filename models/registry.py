"""timm-style registry: ``@register("name")`` on a constructor, ``build(cfg)`` to make a model.

The zoo modules are imported on the first :func:`build`, so importing
``models.config`` (which pipeline.config does) stays free of torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from models.base import Forecaster
    from models.config import ModelConfig

Constructor = Callable[["ModelConfig"], "Forecaster"]
C = TypeVar("C", bound=Constructor)

_REGISTRY: dict[str, Constructor] = {}
_ZOO = ("models.convlstm", "models.swinlstm", "models.datswinlstm_memory")


def register(name: str) -> Callable[[C], C]:
    """Decorator: make ``model.name: <name>`` build this constructor (a class or a function of the config)."""

    def add(constructor: C) -> C:
        if name in _REGISTRY:
            raise ValueError(f"model name {name!r} is registered twice")
        _REGISTRY[name] = constructor
        return constructor

    return add


def _load_zoo() -> None:
    for module in _ZOO:
        importlib.import_module(module)


def available() -> list[str]:
    """Registered model names, in registration order (baselines first)."""
    _load_zoo()
    return list(_REGISTRY)


def build(cfg: ModelConfig) -> Forecaster:
    """The one door into the zoo: the network named by ``cfg.name``, configured by the rest of ``cfg``.

    Raises ValueError naming ``model.name`` for an unknown name; invalid
    combinations are already rejected when the config is validated.
    """
    _load_zoo()
    constructor = _REGISTRY.get(cfg.name)
    if constructor is None:
        raise ValueError(f"model.name: unknown model {cfg.name!r}; registered: {', '.join(sorted(_REGISTRY))}")
    return constructor(cfg)
