"""Every model can learn, not just run: a few hundred steps on a tiny fixed clip of moving blobs."""

from __future__ import annotations

import pytest
import torch

import models
from models.config import ModelConfig

IN_LEN, OUT_LEN, SIDE = 4, 2, 32

TINY = dict(
    embed_dim=16,
    patch_size=4,
    window_size=2,  # SIDE 32 = patch 4 x window 2 x 2^2 stages
    depths_down=[2, 1],
    depths_up=[1, 2],
    heads=[2, 4],
    drop_path=0.0,
    convlstm={"hidden": [16, 16]},
    memory={"slots": 16, "dim": 16},
)


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):  # type: ignore[no-untyped-def]
    """Tiny models are dispatch-bound: one intra-op thread is as fast, and immune to a busy machine."""


def moving_blobs(batch: int = 4, seed: int = 0) -> torch.Tensor:
    """(batch, IN_LEN + OUT_LEN, 1, SIDE, SIDE) on 0-1: one Gaussian blob per clip, constant velocity."""
    generator = torch.Generator().manual_seed(seed)
    start = 8 + 16 * torch.rand(batch, 2, generator=generator)  # (x, y) pixels, away from the edges
    velocity = (torch.rand(batch, 2, generator=generator) - 0.5) * 4  # up to 2 px per frame each way
    t = torch.arange(IN_LEN + OUT_LEN, dtype=torch.float32)
    centre = start[:, None, :] + velocity[:, None, :] * t[None, :, None]  # (B, T, 2)
    grid = torch.arange(SIDE, dtype=torch.float32)
    dx = grid[None, None, None, :] - centre[..., 0, None, None]
    dy = grid[None, None, :, None] - centre[..., 1, None, None]
    return torch.exp(-(dx**2 + dy**2) / (2 * 3.0**2))[:, :, None]  # (B, T, 1, H, W)


def train(name: str, steps: int) -> tuple[float, float, float]:
    """Train on one fixed batch; returns (initial loss, final loss, persistence loss), MSE of the inference path."""
    torch.manual_seed(0)
    model = models.build(ModelConfig(name=name, **TINY))
    clip = moving_blobs()
    x, y = clip[:, :IN_LEN], clip[:, IN_LEN:]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    phases = (1, 2) if model.uses_memory else (2,)

    def inference_loss() -> float:
        model.eval()
        with torch.no_grad():
            loss = torch.mean((model(x, OUT_LEN) - y) ** 2).item()
        model.train()
        return loss

    initial = inference_loss()
    for _ in range(steps):
        for phase in phases:  # the memory model: two optimiser steps per batch
            loss = torch.mean((model(x, OUT_LEN, memory_x=clip, phase=phase) - y) ** 2)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    persistence = torch.mean((x[:, -1:].expand_as(y) - y) ** 2).item()
    return initial, inference_loss(), persistence


@pytest.mark.slow
@pytest.mark.parametrize(("name", "steps"), [("convlstm", 200), ("swinlstm", 300), ("datswinlstm_memory", 150)])
def test_training_drives_the_loss_well_down(name: str, steps: int) -> None:
    initial, final, persistence = train(name, steps)
    assert final < 0.1 * initial
    assert final < 0.5 * persistence  # it learned the motion, not just to copy the last frame
