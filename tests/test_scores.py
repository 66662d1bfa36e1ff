"""Scores (pipeline.scoring.scores): contingency tables, pooled CSI, exactness, undefined scores,
and agreement with pysteps' verification functions as a second implementation."""

from __future__ import annotations

import contextlib
import io
import json
import math

import numpy as np
import pytest
import torch

from pipeline.scoring import ScoreAccumulator, categorical_scores

with contextlib.redirect_stdout(io.StringIO()):  # pysteps prints its config path on import
    from pysteps.verification import detcatscores, detcontscores, spatialscores

THRESHOLDS = (16, 74, 133, 160, 181, 219)


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


def _frames(*frames: np.ndarray) -> torch.Tensor:
    """Frames (H, W) of one window -> uint8 (1, T, 1, H, W)."""
    return torch.from_numpy(np.stack(frames).astype(np.uint8))[None, :, None]


def _table_fields(hits: int, misses: int, false_alarms: int, negatives: int, value: int = 200):
    """A (1, 1, 1, 1, N) forecast/truth pair holding exactly the given contingency table at threshold 16."""
    pred = [value] * hits + [0] * misses + [value] * false_alarms + [0] * negatives
    obs = [value] * hits + [value] * misses + [0] * false_alarms + [0] * negatives
    as_field = lambda v: torch.tensor(v, dtype=torch.uint8).view(1, 1, 1, 1, -1)  # noqa: E731
    return as_field(pred), as_field(obs)


def _score(pred, obs, **kwargs):
    kwargs.setdefault("ssim", False)
    acc = ScoreAccumulator(out_len=pred.shape[1], **kwargs)
    acc.update(pred, obs)
    return acc.compute()


# ------------------------------------------------------------------ contingency tables
def test_categorical_scores_from_a_hand_built_table():
    s = {k: float(v) for k, v in categorical_scores(3, 1, 5, 11).items()}
    assert s["csi"] == pytest.approx(3 / 9)
    assert s["pod"] == pytest.approx(3 / 4)
    assert s["sucr"] == pytest.approx(3 / 8)
    assert s["far"] == pytest.approx(5 / 8)
    assert s["bias"] == pytest.approx(8 / 4)
    # HSS = 2(HR - FM) / ((H+M)(M+R) + (H+F)(F+R)) = 2(33 - 5) / (4*12 + 8*16)
    assert s["hss"] == pytest.approx(56 / 176)


def test_accumulator_reproduces_an_asymmetric_table_and_keeps_forecast_and_truth_apart():
    pred, obs = _table_fields(hits=3, misses=1, false_alarms=5, negatives=11)
    out = _score(pred, obs, thresholds=(16,), pool_sizes=())
    assert out["pod"]["16"] == pytest.approx(3 / 4)
    assert out["sucr"]["16"] == pytest.approx(3 / 8)
    assert out["far"]["16"] == pytest.approx(5 / 8)
    assert out["bias"]["16"] == pytest.approx(2.0)
    assert out["hss"]["16"] == pytest.approx(56 / 176)
    swapped = _score(obs, pred, thresholds=(16,), pool_sizes=())  # forecast and truth exchanged
    assert swapped["pod"]["16"] == pytest.approx(3 / 8)  # POD turns into SUCR: the arguments matter
    assert swapped["sucr"]["16"] == pytest.approx(3 / 4)


def test_aggregate_sums_counts_over_leads_and_per_lead_scores_use_their_lead_only():
    # lead 0: 1 hit, 3 misses; lead 1: 4 hits -> aggregate CSI 5/8, not the mean of 1/4 and 1
    obs = _frames(np.array([[200, 200, 200, 200]]), np.array([[200, 200, 200, 200]]))
    pred = _frames(np.array([[200, 0, 0, 0]]), np.array([[200, 200, 200, 200]]))
    out = _score(pred, obs, thresholds=(16,), pool_sizes=())
    assert out["csi"]["16"] == pytest.approx(5 / 8)
    assert out["per_lead"]["csi"]["16"] == pytest.approx([1 / 4, 1.0])
    assert out["per_lead"]["csi_m"] == pytest.approx([1 / 4, 1.0])


def test_scores_do_not_depend_on_how_the_windows_are_batched():
    gen = torch.Generator().manual_seed(1)
    pred = torch.rand(6, 3, 1, 32, 32, generator=gen)
    obs = (torch.rand(6, 3, 1, 32, 32, generator=gen) * 255).to(torch.uint8)
    whole = ScoreAccumulator(out_len=3, fss_scales=(1, 4))
    whole.update(pred, obs)
    parts = ScoreAccumulator(out_len=3, fss_scales=(1, 4))
    for i in range(0, 6, 4):
        parts.update(pred[i : i + 4], obs[i : i + 4])
    a, b = whole.compute(), parts.compute()
    assert parts.windows == whole.windows == 6
    assert json.dumps(a["csi"]) == json.dumps(b["csi"])
    assert a["mse"] == pytest.approx(b["mse"], rel=1e-9)
    assert a["ssim"] == pytest.approx(b["ssim"], rel=1e-6)
    assert a["fss4_m"] == pytest.approx(b["fss4_m"], rel=1e-9)


# ----------------------------------------------------------------------- undefined
def test_a_threshold_nobody_reaches_is_undefined_null_in_json_and_left_out_of_the_means():
    obs = _frames(np.array([[100, 0], [0, 0]]))
    pred = _frames(np.array([[100, 20], [0, 0]]))
    out = _score(pred, obs, thresholds=(16, 74, 219), pool_sizes=(2,))
    assert out["csi"]["219"] is None and out["pod"]["219"] is None and out["hss"]["219"] is None
    assert out["csi"]["16"] == pytest.approx(1 / 2) and out["csi"]["74"] == pytest.approx(1.0)
    assert out["csi_m"] == pytest.approx(0.75)  # mean of the two defined thresholds only
    assert out["per_lead"]["csi"]["219"] == [None]
    text = json.dumps(out, allow_nan=False)  # NaN would raise: DVC cannot read it
    assert '"219": null' in text


def test_bias_without_observed_events_is_undefined_not_infinite():
    obs = _frames(np.zeros((2, 2)))
    pred = _frames(np.array([[50, 0], [0, 0]]))
    out = _score(pred, obs, thresholds=(16,), pool_sizes=())
    assert out["bias"]["16"] is None and out["pod"]["16"] is None
    assert out["csi"]["16"] == 0.0 and out["far"]["16"] == 1.0
    assert out["csi_m"] == 0.0


def test_a_forecast_holding_nan_has_no_mse_rather_than_invalid_json():
    pred = torch.full((1, 1, 1, 16, 16), float("nan"))
    obs = torch.zeros((1, 1, 1, 16, 16), dtype=torch.uint8)
    acc = ScoreAccumulator(out_len=1, thresholds=(16,), pool_sizes=())
    acc.update(pred, obs)
    out = acc.compute()
    assert out["mse"] is None and out["ssim"] is None
    json.dumps(out, allow_nan=False)


def test_nothing_accumulated_gives_undefined_scores():
    out = ScoreAccumulator(out_len=2).compute()
    assert out["csi_m"] is None and out["mse"] is None and out["ssim"] is None
    assert out["per_lead"]["csi_m"] == [None, None]


# ---------------------------------------------------------------------- exactness
def test_a_pixel_equal_to_the_threshold_is_an_event_in_uint8_and_in_0_1_floats_alike():
    values = np.arange(256, dtype=np.uint8).reshape(16, 16)
    obs = _frames(values)
    shifted = _frames(np.roll(values, 1))
    as_uint8 = _score(shifted, obs, pool_sizes=(4,))
    as_float = _score(shifted.float() / 255, obs.float() / 255, pool_sizes=(4,))
    for key in ("csi", "pod", "sucr", "far", "bias", "hss", "csi_pool4"):
        assert as_uint8[key] == as_float[key]
    # obs >= 74: values 74..255 -> 182 pixels, forecast identical to truth -> every score exact
    same = _score(obs.float() / 255, obs, thresholds=(74,), pool_sizes=())
    assert same["csi"]["74"] == 1.0 and same["bias"]["74"] == 1.0 and same["mse"] == 0.0


def test_model_output_just_below_the_threshold_is_not_an_event():
    obs = _frames(np.full((2, 2), 74))
    below = torch.full((1, 1, 1, 2, 2), 73.999 / 255)
    assert _score(below, obs, thresholds=(74,), pool_sizes=())["pod"]["74"] == 0.0
    at = torch.full((1, 1, 1, 2, 2), 74 / 255)
    assert _score(at, obs, thresholds=(74,), pool_sizes=())["pod"]["74"] == 1.0


def test_persistence_scores_on_a_constructed_case_are_exact():
    # truth moves one pixel right per lead; persistence repeats the last input frame
    last = np.zeros((4, 4), dtype=np.uint8)
    last[1, 0], last[1, 1] = 74, 160  # the threshold value itself and one above 133/160
    lead1, lead2 = np.roll(last, 1, axis=1), np.roll(last, 2, axis=1)
    obs = _frames(lead1, lead2)
    persistence = _frames(last, last)
    out = _score(persistence, obs, thresholds=(74, 160), pool_sizes=(2,))
    # threshold 74: events {(1,0),(1,1)} vs lead 1 {(1,1),(1,2)}: H=1 M=1 F=1; lead 2 {(1,2),(1,3)}: H=0 M=2 F=2
    assert out["per_lead"]["csi"]["74"] == pytest.approx([1 / 3, 0.0])
    assert out["csi"]["74"] == pytest.approx(1 / 7)  # summed H=1 M=3 F=3 (not the mean of 1/3 and 0)
    assert out["pod"]["74"] == pytest.approx(1 / 4) and out["far"]["74"] == pytest.approx(3 / 4)
    # threshold 160: (1,1) vs (1,2) then (1,3): H=0 M=1 F=1 each lead
    assert out["csi"]["160"] == 0.0 and out["bias"]["160"] == 1.0
    # 16 cells per lead, HSS at 74: H=1 M=3 F=3 R=25 -> 2(25 - 9) / (4*28 + 4*28)
    assert out["hss"]["74"] == pytest.approx(32 / 224)
    # pooled k=2: blocks (0,0) and (0,1) of row-block 0; lead 1 events in blocks 0 and 1 vs forecast block 0
    assert out["per_lead"]["csi_pool2_m"][0] == pytest.approx((1 / 2 + 0.0) / 2)
    # MSE on the 0-1 scale: lead 1 differs at (1,0): 74, (1,1): 86, (1,2): 160; lead 2 at (1,0),(1,1),(1,2),(1,3)
    se = [(74**2 + 86**2 + 160**2) / 255**2 / 16, (74**2 + 160**2 + 74**2 + 160**2) / 255**2 / 16]
    assert out["per_lead"]["mse"] == pytest.approx(se)
    assert out["mse"] == pytest.approx(sum(se) / 2)


# ---------------------------------------------------------------------- pooled CSI
def test_pooled_csi_counts_a_near_miss_inside_one_block_as_a_hit():
    obs = np.zeros((8, 8), dtype=np.uint8)
    pred = np.zeros((8, 8), dtype=np.uint8)
    obs[0, 0], pred[3, 3] = 200, 200  # same 4x4 block, different pixels
    pred[0, 7] = 100  # a false alarm in block (0, 1) at thresholds 16 and 74 only
    obs[7, 7] = 20  # a miss in block (1, 1) at threshold 16 only
    out = _score(_frames(pred), _frames(obs), thresholds=(16, 74, 181), pool_sizes=(4,))
    assert out["csi"]["181"] == 0.0  # unpooled: one miss, one false alarm
    assert out["csi_pool4"]["181"] == 1.0  # pooled: both in block (0, 0)
    assert out["csi_pool4"]["74"] == pytest.approx(1 / 2)  # + the false alarm block
    assert out["csi_pool4"]["16"] == pytest.approx(1 / 3)  # + the miss block
    assert out["csi_pool4_m"] == pytest.approx((1 + 1 / 2 + 1 / 3) / 3)


def test_pooling_keeps_edge_blocks_that_do_not_fill_the_kernel():
    obs = np.zeros((6, 6), dtype=np.uint8)
    obs[5, 5] = 200  # only in the partial bottom-right 4x4 block
    out = _score(_frames(obs), _frames(obs), thresholds=(16,), pool_sizes=(4,))
    assert out["csi_pool4"]["16"] == 1.0


# ---------------------------------------------- a second implementation: pysteps
def _pysteps_cat(pred255: np.ndarray, obs255: np.ndarray, thr: float) -> dict[str, float]:
    table = detcatscores.det_cat_fct_init(thr)
    for p, o in zip(pred255, obs255, strict=True):
        detcatscores.det_cat_fct_accum(table, p, o)
    with np.errstate(invalid="ignore", divide="ignore"):  # pysteps returns NaN for 0/0
        return detcatscores.det_cat_fct_compute(table, scores=["CSI", "POD", "FAR", "BIAS", "HSS"])


def _pysteps_fss(pred255: np.ndarray, obs255: np.ndarray, thr: float, scale: int) -> float:
    state = spatialscores.fss_init(thr, scale)
    for p, o in zip(pred255, obs255, strict=True):
        spatialscores.fss_accum(state, p, o)
    return spatialscores.fss_compute(state)


def _random_fields(seed: int, n: int = 5, t: int = 3, size: int = 48):
    """Smooth-ish random VIL fields with events at every threshold: (n, t, 1, size, size) uint8 and float 0-1."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.rand(n, t, 1, size // 8, size // 8, generator=gen)
    obs = torch.nn.functional.interpolate(base.flatten(0, 1), scale_factor=8, mode="bilinear").view(n, t, 1, size, size)
    obs = (obs * 300).clamp(0, 255).round().to(torch.uint8)
    pred = (obs.float() / 255 + 0.15 * torch.randn(obs.shape, generator=gen)).clamp(-0.1, 1.1)
    return obs, pred


@pytest.mark.parametrize("forecast", ["float", "uint8"])
def test_categorical_scores_agree_with_pysteps_on_random_fields(forecast):
    obs, pred = _random_fields(seed=3)
    if forecast == "uint8":
        pred = (pred.clamp(0, 1) * 255).round().to(torch.uint8)
        pred255 = pred.numpy().astype(np.float64)
    else:
        pred255 = (pred * 255).numpy().astype(np.float64)  # float32 product, as the accumulator forms it
    obs255 = obs.numpy().astype(np.float64)
    out = _score(pred, obs, thresholds=THRESHOLDS, pool_sizes=())
    flat = lambda a: a.reshape(-1, *a.shape[-2:])  # noqa: E731
    for thr in THRESHOLDS:
        # pysteps counts value > thr: with thr the float64 just below T that is exactly value >= T
        below = np.nextafter(float(thr), -np.inf)
        ref = _pysteps_cat(flat(pred255), flat(obs255), below)
        ours = {k: out[k][str(thr)] for k in ("csi", "pod", "far", "bias", "hss", "sucr")}
        for name in ("CSI", "POD", "FAR", "BIAS", "HSS"):
            assert ours[name.lower()] == pytest.approx(float(ref[name]), rel=1e-9, abs=1e-12), (thr, name)
        assert ours["sucr"] == pytest.approx(1 - float(ref["FAR"]), rel=1e-9, abs=1e-12)


def test_per_lead_scores_agree_with_pysteps_lead_by_lead():
    obs, pred = _random_fields(seed=4, t=4)
    out = _score(pred, obs, thresholds=(74,), pool_sizes=())
    pred255, obs255 = (pred * 255).numpy().astype(np.float64), obs.numpy().astype(np.float64)
    for lead in range(4):
        ref = _pysteps_cat(pred255[:, lead, 0], obs255[:, lead, 0], np.nextafter(74.0, -np.inf))
        assert out["per_lead"]["csi"]["74"][lead] == pytest.approx(float(ref["CSI"]), rel=1e-9)


def test_pooled_csi_agrees_with_pysteps_on_block_maxima():
    obs, pred = _random_fields(seed=5)
    out = _score(pred, obs, thresholds=THRESHOLDS, pool_sizes=(4, 16))
    pred255, obs255 = (pred * 255).numpy().astype(np.float64), obs.numpy().astype(np.float64)
    for k in (4, 16):
        block_max = lambda a: a.reshape(-1, 48 // k, k, 48 // k, k).max(axis=(2, 4))  # noqa: E731, B023
        for thr in THRESHOLDS:
            ref = _pysteps_cat(block_max(pred255), block_max(obs255), np.nextafter(float(thr), -np.inf))
            got = out[f"csi_pool{k}"][str(thr)]
            want = float(ref["CSI"])
            assert (got is None and math.isnan(want)) or got == pytest.approx(want, rel=1e-9)


def test_mse_and_mae_agree_with_pysteps():
    obs, pred = _random_fields(seed=6)
    out = _score(pred, obs, pool_sizes=())
    obs01 = obs.numpy().astype(np.float64) / 255
    pred01 = pred.numpy().astype(np.float64)
    ref = detcontscores.det_cont_fct(pred01.ravel(), obs01.ravel(), scores=["MSE", "MAE"])
    assert out["mse"] == pytest.approx(ref["MSE"], rel=1e-6)
    assert out["mae"] == pytest.approx(ref["MAE"], rel=1e-6)


@pytest.mark.parametrize("scale", [1, 4, 16])
def test_fss_agrees_with_pysteps(scale):
    obs, pred = _random_fields(seed=7)
    out = _score(pred, obs, pool_sizes=(), fss_scales=(scale,))
    pred255, obs255 = (pred * 255).numpy().astype(np.float64), obs.numpy().astype(np.float64)
    flat = lambda a: a.reshape(-1, *a.shape[-2:])  # noqa: E731
    for thr in THRESHOLDS:
        ref = _pysteps_fss(flat(pred255), flat(obs255), float(thr), scale)  # pysteps' FSS counts value >= thr
        assert out[f"fss{scale}"][str(thr)] == pytest.approx(ref, rel=1e-5, abs=1e-7), thr


def test_ssim_is_pytorch_msssims_11x11_gaussian_per_frame_mean():
    from pytorch_msssim import ssim

    obs, pred = _random_fields(seed=8, n=3, t=4)
    out = _score(pred, obs, pool_sizes=(), ssim=True)
    frames = ssim(pred.flatten(0, 1), obs.flatten(0, 1).float() / 255, data_range=1.0, size_average=False,
                  win_size=11, win_sigma=1.5)  # fmt: skip
    assert out["ssim"] == pytest.approx(float(frames.mean()), rel=1e-5)
    assert out["per_lead"]["ssim"] == pytest.approx(frames.view(3, 4).mean(0).tolist(), rel=1e-5)
    assert _score(obs, obs, pool_sizes=(), ssim=True)["ssim"] == pytest.approx(1.0)


# ------------------------------------------------------------------- the contract
def test_compute_returns_the_metrics_json_block_keys():
    obs, pred = _random_fields(seed=9, t=2)
    acc = ScoreAccumulator(thresholds=THRESHOLDS, pool_sizes=(4, 16), out_len=2, ssim=True)
    acc.update(pred, obs)
    out = acc.compute()
    for key in ("csi_m", "hss_m", "csi_pool4_m", "csi_pool16_m", "mse", "mae", "ssim"):
        assert isinstance(out[key], float), key
    for key in ("csi", "pod", "sucr", "far", "bias", "hss", "csi_pool4", "csi_pool16"):
        assert list(out[key]) == [str(t) for t in THRESHOLDS], key
    assert len(out["per_lead"]["csi"]["16"]) == 2 and len(out["per_lead"]["csi_m"]) == 2
    assert len(out["per_lead"]["mse"]) == 2


def test_update_rejects_mismatched_shapes():
    acc = ScoreAccumulator(out_len=2)
    with pytest.raises(ValueError, match="differs"):
        acc.update(torch.zeros(1, 2, 1, 16, 16), torch.zeros(1, 2, 1, 16, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\(B, 2, 1, H, W\)"):
        acc.update(torch.zeros(1, 3, 1, 16, 16), torch.zeros(1, 3, 1, 16, 16, dtype=torch.uint8))


def test_from_config_takes_the_evaluate_section():
    from pipeline.config import EvaluateConfig

    acc = ScoreAccumulator.from_config(EvaluateConfig(thresholds=[74, 133], pool_sizes=[4], fss_scales=[1]), out_len=2)
    assert acc.thresholds == (74, 133) and acc.pool_sizes == (4,) and acc.fss_scales == (1,) and acc.out_len == 2
