"""model.motion: forecasts are the last input frame carried by a learned flow (models/motion.py)."""

from __future__ import annotations

import pytest
import torch

import models
from models.config import ModelConfig
from models.motion import Evolution, FlowHead, MotionPrior, advect
from tests.test_models_learn import IN_LEN, OUT_LEN, TINY, moving_blobs

NAMES = ("convlstm", "swinlstm", "datswinlstm_memory")


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):  # type: ignore[no-untyped-def]
    """Tiny models are dispatch-bound: one intra-op thread is as fast, and immune to a busy machine."""


def test_advect_moves_a_pixel_by_a_whole_flow_exactly() -> None:
    frame = torch.zeros(1, 1, 8, 8)
    frame[0, 0, 3, 3] = 1.0
    flow = torch.zeros(1, 2, 8, 8)
    flow[:, 0], flow[:, 1] = 1.0, 2.0  # one row down, two columns right
    moved = advect(frame, flow)
    assert moved[0, 0, 4, 5] == pytest.approx(1.0)
    assert moved.sum() == pytest.approx(1.0)
    assert torch.equal(advect(frame, torch.zeros_like(flow)), frame)


def test_rain_from_outside_the_frame_enters_as_zero() -> None:
    frame = torch.ones(1, 1, 8, 8)
    flow = torch.zeros(1, 2, 8, 8)
    flow[:, 1] = 2.0  # everything moves two columns right: columns 0 and 1 come from outside
    moved = advect(frame, flow)
    assert torch.all(moved[..., :2] == 0) and torch.all(moved[..., 2:] == 1)


def test_edge_inflow_carries_the_edge_pixel_in() -> None:
    """model.inflow: edge: what enters from outside the frame is the nearest edge pixel, not 0."""
    frame = torch.zeros(1, 1, 8, 8)
    frame[..., 0] = torch.arange(1.0, 9.0).view(8)  # the left edge column: 1 .. 8 down the rows
    frame[..., 1:] = 0.5
    flow = torch.zeros(1, 2, 8, 8)
    flow[:, 1] = 2.0  # two columns right: columns 0 and 1 come from outside, left of the edge
    moved = advect(frame, flow, "edge")
    assert torch.equal(moved[..., :3], frame[..., :1].expand(-1, -1, -1, 3))  # the edge column, carried in
    assert torch.all(moved[..., 3:] == 0.5)
    assert torch.all(advect(frame, flow, "zero")[..., :2] == 0)


@pytest.mark.parametrize("inflow", ["zero", "edge"])
def test_evolution_inflow_accumulates_the_displacement_at_the_edge(inflow: str) -> None:
    """Over k steps of a constant flow the forecast is the frame shifted k times the flow; at the upwind edge
    edge inflow keeps the edge's rain in (the carried displacement too), zero inflow lets it run dry."""
    frame = torch.zeros(1, 1, 16, 16)
    frame[..., :4] = 1.0  # rain along the left edge, moving right into the frame
    motion = torch.zeros(1, 3, 16, 16)
    motion[:, 1] = 1.0
    evolution = Evolution(frame, inflow=inflow)
    for _ in range(3):
        out = evolution.step(motion)
    assert torch.allclose(out[..., 4:7], torch.ones(1, 1, 16, 3))  # moved 3 columns on, in both
    assert torch.all(out[..., 7:] == 0)
    if inflow == "edge":
        assert torch.allclose(out[..., :4], torch.ones(1, 1, 16, 4))
        assert torch.allclose(evolution.disp[:, 1], torch.full((1, 16, 16), 3.0))  # carried from the edge too
    else:
        assert torch.all(out[..., :3] == 0)


def test_inflow_reaches_the_models_forecast() -> None:
    """model.inflow is what the models' forecasts use: a fresh model with the prior keeps the upwind edge's rain
    with inflow: edge and loses it with zero (the rest of the frame is the same)."""
    torch.manual_seed(0)
    prior = {"kind": "block_matching", "pool": 2, "radius": 4, "lag": 1, "smooth": 4}
    clip = moving_blobs()
    x = clip[:, :IN_LEN].clone()
    x[..., :, :4] = x[..., :, :4] + 0.5  # rain along the left edge of every input frame
    outs = {}
    for inflow in ("zero", "edge"):
        torch.manual_seed(0)
        cfg = ModelConfig(name="convlstm", residual=True, motion=True, prior=prior, inflow=inflow, **TINY)
        with torch.no_grad():
            outs[inflow] = models.build(cfg).eval()(x, OUT_LEN)
    assert not torch.equal(outs["zero"], outs["edge"])
    assert outs["edge"][..., :2].sum() > outs["zero"][..., :2].sum()


def test_inflow_bad_value_is_one_line_naming_the_key() -> None:
    from pipeline.config import from_dict
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match=r"model\.inflow") as err:
        from_dict({"model": {"inflow": "sideways"}})
    assert "\n" not in str(err.value)


def test_evolution_interpolates_the_frame_once_per_lead() -> None:
    """A constant half-pixel flow for 4 steps moves a blob 2 pixels with one bilinear interpolation,
    not four: the blob stays as sharp as a single 2-pixel shift."""
    frame = torch.zeros(1, 1, 16, 16)
    frame[0, 0, 8, 4] = 1.0
    motion = torch.zeros(1, 3, 16, 16)
    motion[:, 1] = 0.5
    evolution = Evolution(frame)
    for _ in range(4):
        out = evolution.step(motion)
    assert out[0, 0, 8, 6] == pytest.approx(1.0, abs=1e-5)
    chained = frame
    for _ in range(4):
        chained = advect(chained, motion[:, :2])
    assert chained.max() < 0.5  # what chained warps would have done: the blob smeared over 5 pixels


def test_flow_head_starts_at_zero_and_is_smooth() -> None:
    head = FlowHead(8, scale=4, channels_last=True)
    tokens = torch.randn(2, 4, 4, 8)
    assert torch.equal(head(tokens), torch.zeros(2, 3, 16, 16))
    torch.nn.init.normal_(head.proj.weight)
    out = head(tokens)
    assert out.shape == (2, 3, 16, 16)
    # bilinear upsampling: neighbouring pixels differ far less than neighbouring tokens
    assert (out[..., 1:] - out[..., :-1]).abs().max() < (out[..., ::4][..., 1:] - out[..., ::4][..., :-1]).abs().max()


@pytest.mark.parametrize("name", NAMES)
def test_a_fresh_motion_model_is_persistence(name: str) -> None:
    torch.manual_seed(0)
    model = models.build(ModelConfig(name=name, residual=True, motion=True, **TINY)).eval()
    clip = moving_blobs()
    x = clip[:, :IN_LEN]
    with torch.no_grad():
        out = model(x, OUT_LEN)
    assert torch.equal(out, x[:, -1:].expand(-1, OUT_LEN, -1, -1, -1))


@pytest.mark.parametrize("name", NAMES)
def test_every_motion_parameter_gets_a_gradient(name: str) -> None:
    torch.manual_seed(0)
    model = models.build(ModelConfig(name=name, residual=True, motion=True, **TINY))
    clip = moving_blobs()
    loss = (model(clip[:, :IN_LEN], OUT_LEN) - clip[:, IN_LEN:]).square().mean()
    loss.backward()
    unused = set(model.unused_parameters(2))
    missing = [n for n, p in model.named_parameters() if p.grad is None and n not in unused]
    assert not missing
    assert model.state_dict().keys().isdisjoint({"backbone.head.proj.weight", "head.weight"})  # no pixel head


def test_motion_needs_residual_in_one_line() -> None:
    with pytest.raises(ValueError, match=r"model\.motion = true needs model\.residual = true"):
        ModelConfig(motion=True, residual=False)


@pytest.mark.slow
def test_a_motion_model_learns_the_motion_of_moving_blobs() -> None:
    """ConvLSTM with the motion output, 150 steps on one batch of moving blobs: well below persistence."""
    torch.manual_seed(0)
    model = models.build(ModelConfig(name="convlstm", residual=True, motion=True, **TINY))
    clip = moving_blobs()
    x, y = clip[:, :IN_LEN], clip[:, IN_LEN:]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        loss = (model(x, OUT_LEN) - y).square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    persistence = (x[:, -1:].expand_as(y) - y).square().mean().item()
    with torch.no_grad():
        final = (model.eval()(x, OUT_LEN) - y).square().mean().item()
    assert final < 0.3 * persistence


def _textured_clip(velocity: tuple[float, float], frames: int = 6, side: int = 128, seed: int = 0) -> torch.Tensor:
    """(1, frames, 1, side, side): a smooth random rain field (cells of 8 px) moving by ``velocity`` (dy, dx)
    px per frame."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.rand(1, 1, side // 8, side // 8, generator=generator)
    field = torch.nn.functional.interpolate(base, size=(side, side), mode="bicubic", align_corners=False).clamp(0, 1)
    flow = torch.tensor(velocity, dtype=torch.float32).view(1, 2, 1, 1).expand(1, 2, side, side)
    return torch.stack([advect(field, flow * t) for t in range(frames)], dim=1)


@pytest.mark.parametrize("velocity", [(0.0, 0.0), (2.0, -1.0), (-3.0, 3.0)])
def test_motion_prior_recovers_a_known_motion(velocity: tuple[float, float]) -> None:
    clip = _textured_clip(velocity)
    flow = MotionPrior()(clip)
    assert flow.shape == (1, 2, 128, 128)
    centre = flow[0, :, 32:96, 32:96].mean(dim=(1, 2))  # away from the edges, where rain enters from outside
    assert centre.tolist() == pytest.approx(list(velocity), abs=0.35)


def test_motion_prior_of_one_frame_or_no_rain_is_zero() -> None:
    clip = _textured_clip((2.0, 1.0))
    assert torch.equal(MotionPrior()(clip[:, :1]), torch.zeros(1, 2, 128, 128))
    assert torch.equal(MotionPrior()(torch.zeros(2, 5, 1, 64, 64)), torch.zeros(2, 2, 64, 64))


@pytest.mark.parametrize("name", NAMES)
def test_a_fresh_model_with_the_prior_extrapolates_the_motion(name: str) -> None:
    """With model.prior, a fresh model forecasts the last input carried by the prior's flow: beyond persistence."""
    torch.manual_seed(0)
    prior = {"kind": "block_matching", "pool": 2, "radius": 4, "lag": 1, "smooth": 4}
    model = models.build(ModelConfig(name=name, residual=True, motion=True, prior=prior, **TINY)).eval()
    clip = moving_blobs()
    x, y = clip[:, :IN_LEN], clip[:, IN_LEN:]
    with torch.no_grad():
        out = model(x, OUT_LEN)
    persistence = (x[:, -1:].expand_as(y) - y).square().mean().item()
    assert (out - y).square().mean().item() < 0.5 * persistence


def test_prior_needs_motion_in_one_line() -> None:
    with pytest.raises(ValueError, match=r"model\.prior\.kind = block_matching needs model\.motion = true"):
        ModelConfig(residual=True, prior={"kind": "block_matching"})


def test_motion_prior_gradients_stay_finite_on_mostly_zero_vil() -> None:
    """Radar frames are mostly exact zeros: the prior's normalised descriptors must not blow up there."""
    clip = torch.zeros(2, 6, 1, 64, 64)
    clip[:, :, :, 20:26, 20:26] = torch.linspace(0.1, 0.6, 6).view(1, 6, 1, 1, 1)  # one small cell, growing
    clip.requires_grad_(True)
    prior = MotionPrior()
    flow = prior(clip)
    flow.square().sum().backward()
    assert torch.isfinite(flow).all()
    assert torch.isfinite(clip.grad).all() and torch.isfinite(prior.log_temperature.grad)


def _explicit_correlation(prior: MotionPrior, src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """The cosine similarity of zero-mean unit-norm ``patch x patch`` descriptors, materialised (unfold)."""
    n, _, h, w = src.shape
    k, r = prior.patch, prior.radius

    def describe(frames: torch.Tensor) -> torch.Tensor:
        patches = torch.nn.functional.unfold(frames, kernel_size=k, padding=k // 2).view(n, k * k, h, w)
        patches = patches - patches.mean(dim=1, keepdim=True)
        return patches * torch.rsqrt(patches.pow(2).sum(dim=1, keepdim=True) + 1e-8)

    a, b = describe(src.double()), torch.nn.functional.pad(describe(dst.double()), (r, r, r, r))
    side = 2 * r + 1
    return torch.stack([(a * b[:, :, i : i + h, j : j + w]).sum(dim=1) for i in range(side) for j in range(side)], 1)


@pytest.mark.parametrize(("patch", "radius"), [(5, 4), (9, 6), (3, 2)])
def test_motion_prior_correlation_equals_the_explicit_descriptors(patch: int, radius: int) -> None:
    """The running-sum correlation is the unfold-and-dot one, displacement by displacement, edges included."""
    generator = torch.Generator().manual_seed(patch)
    src = torch.rand(3, 1, 24, 20, generator=generator) * (torch.rand(3, 1, 24, 20, generator=generator) > 0.5)
    dst = torch.roll(src, shifts=(1, -2), dims=(2, 3)) + 0.05 * torch.rand(3, 1, 24, 20, generator=generator)
    src[0] = 0.0  # a rain-free frame: its zero-variance neighbourhoods correlate 0 with anything
    src[1, :, 4:16, 4:16] = 1.0  # a saturated core (VIL 255): flat, where running sums cancel
    dst[1, :, 5:17, 2:14] = 1.0
    prior = MotionPrior(patch=patch, radius=radius)
    fast = prior.correlation(src, dst)
    assert fast.shape == (3, (2 * radius + 1) ** 2, 24, 20)
    assert torch.allclose(fast.double(), _explicit_correlation(prior, src, dst), atol=1e-4)
    assert fast[0].abs().max() < 1e-2 and fast.abs().max() <= 1 + 1e-4


def test_motion_prior_patch_must_be_odd_in_one_line() -> None:
    with pytest.raises(ValueError, match=r"model\.prior\.patch = 8 must be odd"):
        ModelConfig(residual=True, motion=True, prior={"kind": "block_matching", "patch": 8})
