"""AdamW with per-group learning rates and the lr schedules of ``train.phase{1,2}.schedule``.

Parameter groups: every parameter falls in ``encoder``, ``decoder`` or ``head`` by its name
(:func:`param_group_of`), each with its own lr (``lr_encoder`` / ``lr_decoder`` / ``lr_head``, default
``lr``), and is split by shape: weight decay applies to matrices and kernels, never to biases,
norm scales and other 1-D parameters.

Schedules are multipliers of each group's lr, one value per optimiser step (``LambdaLR``, whose
state is the step count): ``factor(s)`` is the lr of optimiser step ``s`` (0-based), so a run of
``total`` steps uses ``factor(0) .. factor(total - 1)``, and the last of them is the schedule's end
value exactly. A linear warm-up runs over ``warmup_frac`` of all steps:

- ``cosine``: warm-up from 0, then cosine from 1 down to ``min_lr_frac``, reached on the last step
- ``onecycle``: cosine ramp from 1/25 up to 1 over the warm-up, then cosine down to 1/25/1e4 on the
  last step (the OneCycleLR shape, ``div_factor`` 25, ``final_div_factor`` 1e4)
- ``cosine_restarts``: warm-up, then SGDR cosine periods of ``restart_epochs * restart_mult^k``
  epochs, each from 1 down to ``min_lr_frac`` on its own last step; the period the run ends in is
  cut to the steps left, so it too ends at ``min_lr_frac`` on the last step
- ``constant``: warm-up, then 1
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import nn

# name parts that put a parameter in the decoder / head group; everything else is encoder
_DECODER_PARTS = {"up", "expand", "forecaster", "deep_fusion", "decoder"}
_HEAD_PARTS = {"head", "flow_head", "motion_prior"}  # the output layers, model.motion's included


def param_group_of(name: str) -> str:
    """``encoder`` | ``decoder`` | ``head`` for a parameter name of any model of the zoo.

    convlstm: encoder.* / forecaster.* / head.*; Swin models: embed, down, merge (and the memory
    query and bank) / up, expand, deep_fusion / head. ``model.motion``'s output layer (``flow_head``) and
    its prior's sharpness (``motion_prior``) are the head: they draw the forecast, as ``head`` does.
    """
    parts = set(name.split("."))
    if parts & _HEAD_PARTS:
        return "head"
    if parts & _DECODER_PARTS:
        return "decoder"
    return "encoder"


def build_optimizer(model: nn.Module, phase_cfg, exclude: Iterable[nn.Parameter] = ()) -> torch.optim.AdamW:
    """AdamW over the trainable parameters of ``model`` minus ``exclude`` (e.g. the frozen bank)."""
    skip = {id(p) for p in exclude}
    lrs = {"encoder": phase_cfg.lr_encoder, "decoder": phase_cfg.lr_decoder, "head": phase_cfg.lr_head}
    groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in skip:
            continue
        decay = p.ndim >= 2
        groups.setdefault((param_group_of(name), decay), []).append(p)
    param_groups = []
    for (group, decay), params in sorted(groups.items()):
        param_groups.append({
            "params": params, "name": f"{group}{'' if decay else '.no_decay'}",
            "lr": lrs[group] if lrs[group] is not None else phase_cfg.lr,
            "weight_decay": phase_cfg.weight_decay if decay else 0.0,
        })  # fmt: skip
    return torch.optim.AdamW(param_groups, lr=phase_cfg.lr, betas=(phase_cfg.beta1, phase_cfg.beta2))


def lr_multiplier(phase_cfg, total_steps: int, steps_per_epoch: int) -> Callable[[int], float]:
    """step -> lr factor for the configured schedule over ``total_steps`` optimiser steps
    (``factor(total_steps - 1)``, the last step's, is the schedule's floor)."""
    total = max(1, total_steps)
    last = total - 1  # the last optimiser step
    # warm-up steps; at least one step is left to decay on (it ends at the floor)
    warm = min(int(round(phase_cfg.warmup_frac * total)), max(0, total - 2))
    floor = phase_cfg.min_lr_frac
    kind = phase_cfg.schedule

    def cosine(progress: float, hi: float, lo: float) -> float:
        return lo + (hi - lo) * 0.5 * (1 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))

    def decay(step: int) -> float:
        """0 on the first step after the warm-up, 1 on the last step."""
        span = last - warm
        return (step - warm) / span if span > 0 else 1.0

    def factor(step: int) -> float:
        if kind == "onecycle":
            start, end = 1 / 25, 1 / 25 / 1e4
            if step < warm:
                return cosine(step / warm, start, 1.0)  # from start (progress 0) up to 1 (progress 1)
            return cosine(decay(step), 1.0, end)
        if step < warm:
            return (step + 1) / (warm + 1)
        if kind == "constant":
            return 1.0
        if kind == "cosine":
            return cosine(decay(step), 1.0, floor)
        # cosine_restarts (SGDR): periods of restart_epochs * mult^k epochs, in steps; each ends at
        # the floor on its last step, and the period the run ends in is cut to the steps left
        period = max(1, phase_cfg.restart_epochs * steps_per_epoch)
        begin = warm
        while step >= begin + period:
            begin += period
            period *= phase_cfg.restart_mult
        length = min(period, total - begin)
        return cosine((step - begin) / (length - 1), 1.0, floor) if length > 1 else floor

    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, phase_cfg, total_steps: int,
                    steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:  # fmt: skip
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(phase_cfg, total_steps, steps_per_epoch))
