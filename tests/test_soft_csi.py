"""train.phaseN.csi_weight: the differentiable CSI of pipeline/training/losses.py against the scores' CSI."""

from __future__ import annotations

import pytest
import torch

from pipeline.config import PhaseConfig
from pipeline.training.losses import ForecastLoss, soft_csi

THRESHOLDS = torch.tensor([16.0, 74.0, 133.0]) / 255


def _cell(shift: int = 0) -> torch.Tensor:
    frame = torch.zeros(2, 3, 1, 32, 32)
    frame[..., 8:16, 8 + shift : 16 + shift] = 0.6  # VIL 153: above every threshold
    return frame


def test_soft_csi_matches_the_hard_csi_of_clear_forecasts() -> None:
    target = _cell()
    assert soft_csi(target, target, THRESHOLDS, 2 / 255).item() == pytest.approx(1.0, abs=5e-3)  # sigmoid tails
    assert soft_csi(torch.zeros_like(target), target, THRESHOLDS, 2 / 255).item() == pytest.approx(0.0, abs=1e-3)
    # shifted by half its width: 4 x 8 hits, 32 misses, 32 false alarms -> CSI 1/3 at every threshold
    assert soft_csi(_cell(4), target, THRESHOLDS, 2 / 255).item() == pytest.approx(1 / 3, abs=1e-2)
    # no event anywhere: nothing to score, CSI 1 (a dry forecast of a dry scene is perfect)
    dry = torch.zeros_like(target)
    assert soft_csi(dry, dry, THRESHOLDS, 2 / 255).item() == pytest.approx(1.0)


def test_the_csi_term_has_a_gradient_towards_the_rain() -> None:
    target = _cell()
    pred = (target * 0.1 + 0.05).requires_grad_(True)  # everywhere below the upper thresholds
    loss, parts = ForecastLoss(PhaseConfig(l1_weight=0.0, l2_weight=0.0, csi_weight=1.0))(pred, target)
    loss.backward()
    assert torch.isfinite(pred.grad).all()
    inside = pred.grad[..., 8:16, 8:16].mean()
    assert inside < 0  # raising the forecast inside the cell lowers the loss
    assert "soft_csi" in parts


def test_an_empty_loss_is_refused_in_one_line() -> None:
    with pytest.raises(ValueError, match="csi_weight are all 0"):
        PhaseConfig(l1_weight=0.0, l2_weight=0.0, ssim_weight=0.0, csi_weight=0.0)
