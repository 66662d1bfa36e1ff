"""The search space: params.yaml ``search.space`` entries turned into Optuna suggestions.

Each entry names a dotted params key. Optuna parameter names are those keys, so a
trial's params read like params.yaml and map one to one onto ``dvc exp run -S``.
Categorical choices that are lists (``model.depths_down: [2, 4]``) are stored in
Optuna as their JSON text and decoded back when applied.

Sampling is conditional (define-by-run), so the sampler never draws a combination the
config check would refuse: phase-1 gradient accumulation cannot be combined with the memory
model's alignment step, so ``train.phase1.grad_accum`` is drawn only when the trial's
``train.phase1.align`` (drawn or fixed) is off or the model has no memory; otherwise it is
fixed at 1 (recorded in the trial's ``not_drawn`` user attribute). Hand-written params
with both still get the config check's one-line refusal.
"""

from __future__ import annotations

import copy
import json
import shlex
from collections.abc import Mapping, Sequence
from typing import Any

import optuna

from pipeline import config as config_mod
from pipeline.config import Config, SearchParam
from pipeline.errors import ConfigError


def _encode(choice: Any) -> Any:
    return json.dumps(choice) if isinstance(choice, list | dict) else choice


def _is_encoded(param: SearchParam) -> bool:
    return param.type == "categorical" and any(isinstance(c, list | dict) for c in param.choices or [])


def distribution(param: SearchParam) -> optuna.distributions.BaseDistribution:
    """The Optuna distribution of one entry."""
    if param.type == "categorical":
        return optuna.distributions.CategoricalDistribution([_encode(c) for c in param.choices or []])
    if param.type == "int":
        return optuna.distributions.IntDistribution(int(param.low), int(param.high), step=int(param.step or 1))  # type: ignore[arg-type]
    return optuna.distributions.FloatDistribution(
        float(param.low),
        float(param.high),
        log=param.type == "logfloat",
        step=param.step,  # type: ignore[arg-type]
    )


def signature(space: Sequence[SearchParam]) -> str:
    """A stable text of the space, stored with the study to detect a changed space."""
    return json.dumps(
        {p.key: optuna.distributions.distribution_to_json(distribution(p)) for p in space}, sort_keys=True
    )


def describe_change(stored: str, current: str) -> str:
    """Which keys were added, removed or changed between two :func:`signature` texts."""
    old, new = json.loads(stored), json.loads(current)
    parts = [f"+{k}" for k in sorted(set(new) - set(old))] + [f"-{k}" for k in sorted(set(old) - set(new))]
    parts += [f"~{k}" for k in sorted(set(old) & set(new)) if old[k] != new[k]]
    return ", ".join(parts) or "order"


FIXED_ATTR = "not_drawn"  # user attr: {key: value} a trial did not draw because its other draws rule it out
MEMORY_MODEL = "datswinlstm_memory"
ACCUM_KEY, ALIGN_KEY, NAME_KEY = "train.phase1.grad_accum", "train.phase1.align", "model.name"


def _base_value(base: Config | None, key: str, default: Any) -> Any:
    node: Any = base
    for part in key.split("."):
        if node is None:
            return default
        node = getattr(node, part, None)
    return default if node is None else node


def fixed_by_others(key: str, drawn: Mapping[str, Any], base: Config | None) -> tuple[bool, Any]:
    """Whether ``key`` is ruled out by what the trial drew so far (``drawn``) and the fixed params
    (``base``), and the only value it may take then."""
    if key == ACCUM_KEY:
        name = drawn.get(NAME_KEY, _base_value(base, NAME_KEY, MEMORY_MODEL))
        align = drawn.get(ALIGN_KEY, _base_value(base, ALIGN_KEY, True))
        if name == MEMORY_MODEL and align:
            return True, 1
    return False, None


def _sample_order(space: Sequence[SearchParam]) -> list[SearchParam]:
    """The entries in the order they are drawn: the conditioned ones after those they depend on."""
    conditioned = {ACCUM_KEY}
    return [p for p in space if p.key not in conditioned] + [p for p in space if p.key in conditioned]


def suggest(trial: optuna.Trial, space: Sequence[SearchParam], base: Config | None = None) -> dict[str, Any]:
    """Ask the trial for one value per entry; returns ``{dotted key: value}`` (lists decoded), in the
    space's order. An entry ruled out by the other draws (:func:`fixed_by_others`, given the fixed params
    ``base``) is not drawn: it takes its only possible value, recorded in the trial's ``not_drawn`` attribute."""
    out: dict[str, Any] = {}
    fixed: dict[str, Any] = {}
    for param in _sample_order(space):
        ruled_out, value = fixed_by_others(param.key, out, base)
        if ruled_out:
            out[param.key] = fixed[param.key] = value
            continue
        if param.type == "categorical":
            value = trial.suggest_categorical(param.key, [_encode(c) for c in param.choices or []])
            out[param.key] = json.loads(value) if _is_encoded(param) else value
        elif param.type == "int":
            out[param.key] = trial.suggest_int(param.key, int(param.low), int(param.high), step=int(param.step or 1))  # type: ignore[arg-type]
        else:
            out[param.key] = trial.suggest_float(
                param.key,
                float(param.low),
                float(param.high),
                step=param.step,
                log=param.type == "logfloat",  # type: ignore[arg-type]
            )
    if fixed:
        trial.set_user_attr(FIXED_ATTR, fixed)
    return {p.key: out[p.key] for p in space}


def decode(params: Mapping[str, Any], space: Sequence[SearchParam],
           fixed: Mapping[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    """A stored trial's params (Optuna form) -> params.yaml values, in the space's order; ``fixed`` (the
    trial's ``not_drawn`` attribute) adds the values it did not draw."""
    encoded = {p.key for p in space if _is_encoded(p)}
    values = {k: json.loads(v) if k in encoded and isinstance(v, str) else v for k, v in params.items()}
    values.update(fixed or {})
    order = [p.key for p in space]
    return dict(sorted(values.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))


def apply_overrides(cfg: Config, overrides: Mapping[str, Any], source: str = "search trial") -> Config:
    """``cfg`` with dotted-key overrides applied and validated as a whole.

    An impossible combination (e.g. heads that do not divide embed_dim) raises the same one-line
    :class:`ConfigError` params.yaml would give, with ``source`` in place of the file name.
    """
    raw = copy.deepcopy(cfg.model_dump(mode="json"))
    for key, value in overrides.items():
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"{source}: {key}: not a params.yaml key")
            node = node[part]
        node[leaf] = value
    return config_mod.from_dict(raw, source=source)


def _yaml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ",".join(_yaml_value(v) for v in value) + "]"
    return str(value)


def exp_run_command(overrides: Mapping[str, Any], name: str | None = None) -> str:
    """The exact ``dvc exp run -S key=value ...`` line that applies ``overrides`` to params.yaml."""
    parts = ["dvc", "exp", "run"]
    if name:
        parts += ["-n", name]
    for key, value in overrides.items():
        parts += ["-S", f"{key}={_yaml_value(value)}"]
    return shlex.join(parts)
