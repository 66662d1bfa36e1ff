"""Exponential moving average of a model's weights (``train.phase{1,2}.ema_decay``)."""

from __future__ import annotations

import torch
from torch import nn


class EMA:
    """ema <- ema + (1 - decay) * (w - ema) after every optimiser step, for every floating tensor of
    the state dict; integer buffers are copied.

    ``torch.lerp`` leaves an entry bit-identical when the weight has not moved (a frozen memory
    bank stays exactly frozen in the EMA too).
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for key, value in model.state_dict().items():
            ema = self.shadow[key]
            if ema.is_floating_point():
                ema.lerp_(value.detach().to(ema.dtype), 1.0 - self.decay)
            else:
                ema.copy_(value)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for key, value in state.items():
            self.shadow[key].copy_(value)
