"""The training engine's parts, one behaviour each: schedules, parameter groups, losses, EMA, sampling,
oversampling, augmentation, config checks. No training loop here (see test_training.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import models
from models.config import ModelConfig
from pipeline import config
from pipeline.config import AugmentConfig, PhaseConfig
from pipeline.errors import ConfigError
from pipeline.training.data import EpochSampler, augment, heavy_weights
from pipeline.training.ema import EMA
from pipeline.training.losses import ForecastLoss
from pipeline.training.optim import build_optimizer, lr_multiplier, param_group_of


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):  # type: ignore[no-untyped-def]
    pass


# ------------------------------------------------------------------------------ schedules
def _curve(schedule: str, total: int = 100, per_epoch: int = 10, **kw) -> list[float]:
    f = lr_multiplier(PhaseConfig(schedule=schedule, **kw), total, per_epoch)
    return [f(s) for s in range(total)]


def test_cosine_warms_up_linearly_then_decays_to_the_floor():
    c = _curve("cosine", warmup_frac=0.1, min_lr_frac=0.05)
    assert c[:10] == sorted(c[:10]) and c[0] < 0.2 and c[10] == pytest.approx(1.0)
    assert c[10:] == sorted(c[10:], reverse=True) and c[-1] == pytest.approx(0.05, abs=2e-3)


def test_onecycle_starts_low_peaks_after_warmup_and_ends_near_zero():
    c = _curve("onecycle", warmup_frac=0.3)
    assert c[0] == pytest.approx(1 / 25) and max(c) == pytest.approx(1.0) and c.index(max(c)) == 30
    assert c[-1] < 1e-3


def test_cosine_restarts_return_to_the_peak_at_each_period():
    c = _curve("cosine_restarts", warmup_frac=0.0, restart_epochs=1, restart_mult=2)  # periods of 10, 20, 40 steps
    assert [s for s in range(1, 100) if c[s] > c[s - 1]] == [10, 30, 70]
    assert all(c[s] == pytest.approx(1.0) for s in (0, 10, 30, 70))


def test_constant_is_flat_after_warmup():
    c = _curve("constant", warmup_frac=0.2)
    assert c[20:] == [1.0] * 80 and c[0] < 0.1


# ------------------------------------------------------------------------------ param groups
@pytest.mark.parametrize("name", ["convlstm", "swinlstm", "datswinlstm_memory"])
def test_every_model_splits_into_encoder_decoder_and_head_groups(name):
    model = models.build(ModelConfig(name=name))
    groups = {param_group_of(n) for n, _ in model.named_parameters()}
    assert groups == {"encoder", "decoder", "head"}


@pytest.mark.parametrize("name", ["convlstm", "swinlstm", "datswinlstm_memory"])
def test_the_motion_output_and_its_prior_are_the_head_group(name):
    """model.motion draws the forecast with its flow head: lr_head must reach it, not the encoder's lr."""
    cfg = ModelConfig(name=name, residual=True, motion=True, prior={"kind": "block_matching"})
    groups = {n: param_group_of(n) for n, _ in models.build(cfg).named_parameters()}
    motion = {n: g for n, g in groups.items() if "flow_head" in n or "motion_prior" in n}
    assert len(motion) == 5 and set(motion.values()) == {"head"}


def test_group_learning_rates_and_no_decay_on_biases_and_norms():
    model = models.build(ModelConfig(name="swinlstm"))
    opt = build_optimizer(model, PhaseConfig(lr=1e-3, lr_head=5e-4, lr_decoder=2e-3, weight_decay=0.1))
    by_name = {g["name"]: g for g in opt.param_groups}
    assert by_name["head"]["lr"] == 5e-4 and by_name["decoder"]["lr"] == 2e-3 and by_name["encoder"]["lr"] == 1e-3
    assert all(g["weight_decay"] == 0.0 for n, g in by_name.items() if n.endswith(".no_decay"))
    assert all(p.ndim <= 1 for n, g in by_name.items() if n.endswith(".no_decay") for p in g["params"])
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == sum(p.numel() for p in model.parameters())


def test_excluded_parameters_are_not_optimised():
    model = models.build(ModelConfig(name="datswinlstm_memory"))
    opt = build_optimizer(model, PhaseConfig(), exclude=model.memory_parameters())
    assert all(p is not model.memory.bank for g in opt.param_groups for p in g["params"])


# ------------------------------------------------------------------------------ losses
def test_balanced_weights_follow_the_intensity_class_of_the_target():
    loss = ForecastLoss(PhaseConfig(balanced=True))
    vil = torch.tensor([0, 15, 16, 73, 74, 132, 133, 180, 181, 255], dtype=torch.float32) / 255
    assert loss.pixel_weights(vil).tolist() == [1, 1, 2, 2, 5, 5, 10, 10, 30, 30]


def test_balanced_loss_weighs_heavy_rain_errors_more():
    target = torch.zeros(1, 2, 1, 16, 16)
    target[..., :4, :4] = 200 / 255
    pred = torch.zeros_like(target)
    plain, _ = ForecastLoss(PhaseConfig())(pred, target)
    balanced, parts = ForecastLoss(PhaseConfig(balanced=True))(pred, target)
    assert balanced.item() == pytest.approx(30 * plain.item(), rel=1e-5)
    assert set(parts) == {"l1", "mse"}


def test_ssim_term_is_zero_for_a_perfect_forecast_and_positive_otherwise():
    torch.manual_seed(0)
    target = torch.rand(2, 3, 1, 32, 32)
    fn = ForecastLoss(PhaseConfig(l1_weight=0.0, l2_weight=0.0, ssim_weight=1.0))
    perfect, parts = fn(target.clone(), target)
    assert perfect.item() == pytest.approx(0.0, abs=1e-5) and parts["ssim"].item() == pytest.approx(1.0, abs=1e-5)
    assert fn(torch.zeros_like(target), target)[0].item() > 0.5


# ------------------------------------------------------------------------------ EMA
def test_ema_averages_moving_weights_and_leaves_a_frozen_one_bit_identical():
    model = torch.nn.Linear(4, 3)
    frozen = model.bias.detach().clone()
    ema = EMA(model, decay=0.9)
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    assert torch.allclose(ema.state_dict()["weight"], model.weight - 0.9)
    assert torch.equal(ema.state_dict()["bias"], frozen)


# ------------------------------------------------------------------------------ sampling
def test_epoch_order_is_a_function_of_seed_and_epoch():
    a, b = EpochSampler(50, seed=3), EpochSampler(50, seed=3)
    a.set_epoch(2)
    b.set_epoch(2)
    assert list(a) == list(b) and sorted(a) == list(range(50))
    b.set_epoch(3)
    assert list(a) != list(b)


def test_ranks_get_disjoint_equal_shards_covering_the_epoch():
    shards = [list(EpochSampler(10, seed=0, num_replicas=3, rank=r)) for r in range(3)]
    assert {len(s) for s in shards} == {4}
    assert set().union(*shards) == set(range(10))
    assert len(set(shards[0]) & set(shards[1])) <= 1  # only the wrap-around padding repeats


def test_weighted_sampling_draws_heavy_windows_more_often():
    weights = torch.ones(100, dtype=torch.float64)
    weights[:10] = 5.0
    drawn = list(EpochSampler(100, seed=0, weights=weights))
    assert len(drawn) == 100
    heavy_share = sum(i < 10 for i in drawn) / 100
    assert 0.2 < heavy_share < 0.5  # expected 50 / 140 = 0.36, against 0.10 unweighted


def test_heavy_weights_mark_the_windows_whose_targets_reach_the_threshold(tmp_path):
    import h5py

    from tests.test_dataset import write_windows_file

    vil = np.zeros((2, 12, 8, 8), dtype=np.uint8)
    vil[1, 6:, :4, :4] = 200  # event 1: heavy rain in its later frames
    path = write_windows_file(tmp_path / "train.h5", vil, starts=(0, 4), in_len=4, window_len=8)
    with h5py.File(path) as h5:
        events, starts = h5["window_event"][()], h5["window_start"][()]
        in_len = int(h5.attrs["in_len"])
        out_len = int(h5.attrs["window_len"]) - in_len
    weights = heavy_weights(path, threshold=133, min_fraction=0.1, factor=4.0)
    expected = [4.0 if (vil[e, s + in_len : s + in_len + out_len] >= 133).mean() >= 0.1 else 1.0
                for e, s in zip(events, starts, strict=True)]  # fmt: skip
    assert weights.tolist() == expected and 4.0 in expected and 1.0 in expected


# ------------------------------------------------------------------------------ augmentation
def _batch(in_len=3, out_len=2, extra=2):
    torch.manual_seed(0)
    clip = torch.rand(2, extra + in_len + out_len, 1, 32, 32)
    return {"inputs": clip[:, extra : extra + in_len], "targets": clip[:, extra + in_len :], "memory": clip}


def test_augmentation_never_touches_targets_and_keeps_inputs_on_the_unit_scale():
    batch = _batch()
    out = augment(dict(batch), AugmentConfig(noise_std=0.5, mask_prob=0.5, mask_size=8), 3, 2)
    assert torch.equal(out["targets"], batch["targets"])
    assert out["inputs"].min() >= 0 and out["inputs"].max() <= 1 and not torch.equal(out["inputs"], batch["inputs"])


def test_masking_zeroes_whole_patches_in_every_input_frame():
    batch = _batch()
    out = augment(dict(batch), AugmentConfig(mask_prob=0.5, mask_size=8), 3, 2)["inputs"]
    zero = (out == 0).reshape(2, 3, 1, 4, 8, 4, 8).all(dim=-1).all(dim=-2)  # (B, T, C, 4, 4) patches all zero
    assert zero.any() and not zero.all()
    assert torch.equal(zero[:, 0], zero[:, 1]) and torch.equal(zero[:, 1], zero[:, 2])


def test_time_shift_cuts_an_earlier_window_from_the_long_clip():
    batch = _batch()
    torch.manual_seed(1)
    shifted = [augment(dict(batch), AugmentConfig(time_shift=2), 3, 2) for _ in range(20)]
    clip = batch["memory"]
    for out in shifted:
        end = out["memory"].shape[1]
        assert torch.equal(out["targets"], clip[:, end - 2 : end]) and torch.equal(
            out["inputs"], clip[:, end - 5 : end - 2]
        )
    assert {out["memory"].shape[1] for out in shifted} == {5, 6, 7}


# ------------------------------------------------------------------------------ config
@pytest.mark.parametrize(
    ("train", "windows", "expected"),
    [
        ({"phase1": {"grad_accum": 2}}, {}, "train.phase1.grad_accum"),
        ({"augment": {"time_shift": 2}}, {}, "train.augment.time_shift = 2 needs windows.memory_len"),
        ({"phase1": {"balance_weights": [1.0, 2.0]}}, {}, "balance_weights needs one more entry"),
        ({"phase2": {"best_key": "csi_m"}}, {}, "best_key"),
        ({"batch_size": "big"}, {}, "train.batch_size"),
        ({"phase1": {"schedule": "linear"}}, {}, "train.phase1.schedule"),
    ],
)
def test_bad_train_params_name_the_key(train, windows, expected):
    with pytest.raises(ConfigError) as err:
        config.from_dict({"train": train, "windows": windows})
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_time_shift_with_room_in_the_long_clip_is_accepted():
    cfg = config.from_dict({"train": {"augment": {"time_shift": 2}}, "windows": {"memory_len": 27}})
    assert cfg.train.augment.time_shift == 2 and cfg.train.batch_size == 4


def test_best_mode_auto_minimises_losses_and_maximises_scores():
    assert PhaseConfig(best_key="val.loss").mode() == "min"
    assert PhaseConfig(best_key="val.mse").mode() == "min"
    assert PhaseConfig(best_key="val.csi_m").mode() == "max"
    assert PhaseConfig(best_key="val.loss", best_mode="max").mode() == "max"
    assert math.isfinite(PhaseConfig().lr)
