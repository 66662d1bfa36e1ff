"""Every model.* architecture option: zero-dominant gradients, phase semantics, learning, errors.

Tiny configs on 64 x 64 frames (the frame rule: patch 4 x window 2 x 2^2 stages = 32), so the whole
file runs in about a minute on one core.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import models
from models.config import ModelConfig
from models.memory import MotionQuery
from pipeline.config import from_dict
from pipeline.errors import ConfigError
from pipeline.sevir._fields import render_event

SIDE, IN_LEN, OUT_LEN = 64, 3, 2
TINY = dict(
    embed_dim=16,
    patch_size=4,
    window_size=2,
    depths_down=[2, 1],
    depths_up=[1, 2],
    heads=[2, 4],
    drop_path=0.0,
    memory={"slots": 8, "dim": 16, "heads": 4},
)
MEM = "datswinlstm_memory"

# (model name, overrides): every option value at least once, on each model it applies to
VARIANTS = [
    ("swinlstm", {}),
    ("swinlstm", {"pos": "absolute"}),
    ("swinlstm", {"pos": "sincos"}),
    ("swinlstm", {"pos": "rotary"}),
    ("swinlstm", {"skips": True}),
    ("swinlstm", {"head": "linear"}),
    (MEM, {}),
    (MEM, {"memory": {"read": "cosine"}}),
    (MEM, {"memory": {"fusion": "gated"}}),
    (MEM, {"memory": {"fusion": "concat"}}),
    (MEM, {"memory": {"fusion": "cross_attention"}}),
    (MEM, {"memory": {"encoders": "shared"}}),
    (MEM, {"dat": {"sampling": "global", "offset_range": 2.0}}),
    (MEM, {"pos": "absolute"}),
    (MEM, {"pos": "sincos"}),
    (MEM, {"pos": "rotary"}),
    (MEM, {"skips": True, "head": "linear"}),
]
IDS = [f"{name}-{overrides}" for name, overrides in VARIANTS]


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):  # type: ignore[no-untyped-def]
    """Tiny models are dispatch-bound: one intra-op thread is as fast, and immune to a busy machine."""


def config(name: str, overrides: dict) -> ModelConfig:
    merged = {**TINY, **overrides}
    merged["memory"] = {**TINY["memory"], **overrides.get("memory", {})}
    return ModelConfig(name=name, **merged)


def build(name: str, overrides: dict, seed: int = 0) -> models.base.Forecaster:
    torch.manual_seed(seed)
    return models.build(config(name, overrides))


def zero_dominant(kind: str) -> torch.Tensor:
    """(2, IN_LEN + OUT_LEN, 1, 64, 64): all zeros, or radar-like VIL from the sample's generator (mostly 0)."""
    if kind == "zeros":
        return torch.zeros(2, IN_LEN + OUT_LEN, 1, SIDE, SIDE)
    vil = np.stack([render_event(np.random.default_rng(s), SIDE, IN_LEN + OUT_LEN, storm=False) for s in (10, 14)])
    return torch.from_numpy(vil).permute(0, 3, 1, 2)[:, :, None].float() / 255.0


def grad_norm(model: torch.nn.Module) -> float:
    return torch.stack([p.grad.float().pow(2).sum() for p in model.parameters() if p.grad is not None]).sum().sqrt()


def step_loss(model: torch.nn.Module, clips: torch.Tensor, phase: int) -> torch.Tensor:
    x, y = clips[:, :IN_LEN], clips[:, IN_LEN:]
    return (model(x, OUT_LEN, memory_x=clips, phase=phase) - y).abs().mean()


def test_the_sample_clips_are_zero_dominant() -> None:
    assert (zero_dominant("sample") == 0).float().mean() > 0.8
    assert (moving_clip() == 0).float().mean() > 0.8


@pytest.mark.parametrize("kind", ["zeros", "sample"])
@pytest.mark.parametrize(("name", "overrides"), VARIANTS, ids=IDS)
def test_every_option_gives_finite_bounded_gradients_on_zero_dominant_input(
    name: str, overrides: dict, kind: str
) -> None:
    model = build(name, overrides)
    clips = zero_dominant(kind)
    for phase in (1, 2) if model.uses_memory else (2,):
        model.zero_grad(set_to_none=True)
        loss = step_loss(model, clips, phase)
        loss.backward()
        norm = grad_norm(model)
        assert torch.isfinite(loss) and math.isfinite(norm) and 0 < norm < 100, (phase, norm)
        unused = [n for n, p in model.named_parameters() if p.grad is None]
        assert unused == model.unused_parameters(phase)


@pytest.mark.parametrize(("name", "overrides"), [v for v in VARIANTS if v[0] == MEM], ids=IDS[6:])
def test_phase1_trains_bank_and_context_encoder_phase2_reads_the_bank_frozen(name: str, overrides: dict) -> None:
    model = build(name, overrides)
    clips = zero_dominant("sample")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    context = model.context_encoder
    matching = model.matching_encoder if model.matching_encoder is not None else context
    for phase in (1, 2):
        bank = model.memory.bank.detach().clone()
        ctx = [p.detach().clone() for p in context.parameters()]
        mat = [p.detach().clone() for p in matching.parameters()]
        optimizer.zero_grad(set_to_none=True)
        step_loss(model, clips, phase).backward()
        optimizer.step()
        moved_bank = not torch.equal(model.memory.bank, bank)
        moved_ctx = any(not torch.equal(p, q) for p, q in zip(context.parameters(), ctx, strict=True))
        moved_mat = any(not torch.equal(p, q) for p, q in zip(matching.parameters(), mat, strict=True))
        if phase == 1:
            assert moved_bank and moved_ctx
            assert moved_mat == (matching is context)  # a separate matching encoder is untouched by phase 1
        else:
            assert not moved_bank  # bit-identical
            assert moved_mat
            assert moved_ctx == (matching is context)


@pytest.mark.slow
@pytest.mark.parametrize(("name", "overrides"), VARIANTS, ids=IDS)
def test_every_option_learns_a_fixed_clip(name: str, overrides: dict) -> None:
    """A few AdamW steps on one fixed zero-dominant batch drive the inference loss down."""
    model = build(name, overrides)
    clips = zero_dominant("sample")
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)

    def inference_loss() -> float:
        with torch.no_grad():
            return step_loss(model.eval(), clips, phase=2).item()

    initial = inference_loss()
    model.train()
    for _ in range(8):  # 16 optimiser steps for every model
        for phase in (1, 2) if model.uses_memory else (2, 2):
            optimizer.zero_grad(set_to_none=True)
            step_loss(model, clips, phase).backward()
            optimizer.step()
    final = inference_loss()
    assert final < 0.7 * initial, (initial, final)


# ---------------------------------------------------------------- motion
@pytest.mark.parametrize("shift", [(1, 0), (0, -1), (-1, 1), (2, -2)])
def test_motion_module_recovers_a_known_shift(shift: tuple[int, int]) -> None:
    """Frame t is frame t-1 rolled by (dy, dx) tokens: the soft-argmax flow is (dy, dx), confidently."""
    torch.manual_seed(0)
    module = MotionQuery(1, 32, patch=4, downs=2, radius=2)
    first = torch.randn(2, 32, 12, 12)
    frames = [first, torch.roll(first, shifts=shift, dims=(2, 3))]
    frames.append(torch.roll(frames[-1], shifts=(-shift[0], -shift[1]), dims=(2, 3)))  # and back
    feats = torch.stack(frames, dim=1)  # (B, T=3, D, h, w)
    flow, confidence = module.flow(feats)
    inner = (slice(None), slice(None), slice(None), slice(3, -3), slice(3, -3))  # away from the wrapped border
    expected = torch.tensor(shift, dtype=torch.float32)
    torch.testing.assert_close(flow[:, 0][inner[1:]].mean(dim=(0, 2, 3)), expected, atol=0.05, rtol=0)
    torch.testing.assert_close(flow[:, 1][inner[1:]].mean(dim=(0, 2, 3)), -expected, atol=0.05, rtol=0)
    assert confidence[inner].min() > 0.9


def test_motion_query_compares_consecutive_frames_of_each_sample() -> None:
    """The per-frame features keep (sample, time) order: a motion in sample 1 between frames 2 and 3 shows
    up exactly there (no time/channel or sample/time view mix-up)."""
    torch.manual_seed(0)
    module = MotionQuery(1, 16, patch=4, downs=0, radius=1)
    feats = torch.randn(2, 1, 16, 8, 8).repeat(1, 4, 1, 1, 1)  # static clips
    feats[1, 3] = torch.roll(feats[1, 2], shifts=(1, 0), dims=(1, 2))
    flow, _ = module.flow(feats)
    moved = flow[..., 2:-2, 2:-2].abs().amax(dim=(2, 3, 4)) > 0.5  # (B, T-1)
    assert moved.tolist() == [[False, False, False], [False, False, True]]


# ---------------------------------------------------------------- combinations
DEPTHS = [[1], [2, 1], [1, 3], [3, 2], [1, 1, 1]]
HEADS = [[1], [2], [4], [2, 4], [4, 8], [3, 6], [8, 4], [1, 2, 4], [2, 2, 2]]


@pytest.mark.parametrize("pos", ["relative", "rotary"])
@pytest.mark.parametrize("name", ["swinlstm", MEM])
def test_every_depths_heads_combination_is_valid_or_refused_up_front(name: str, pos: str) -> None:
    """What a search may draw: either the config is refused with one line naming model.* keys, or it runs."""
    ran = refused = 0
    for down in DEPTHS:
        for up in DEPTHS:
            for heads in HEADS:
                section = dict(
                    name=name, embed_dim=16, patch_size=4, window_size=2, depths_down=down, depths_up=up,
                    heads=heads, pos=pos, memory={"slots": 4, "dim": 8, "heads": 2},
                )  # fmt: skip
                try:
                    cfg = from_dict({"model": section, "windows": {"downsample": 1}}).model
                except ConfigError as err:
                    assert "\n" not in str(err) and "model." in str(err)
                    refused += 1
                    continue
                if len(down) != 2 or down == up:
                    continue  # forward only a sample of the valid ones: enough to catch a shape error
                side = cfg.spatial_multiple()
                torch.manual_seed(0)
                y = models.build(cfg)(torch.zeros(1, 1, 1, side, side), 1, memory_x=torch.zeros(1, 2, 1, side, side))
                assert y.shape == (1, 1, 1, side, side) and torch.isfinite(y).all()
                ran += 1
    assert ran > 0 and refused > 0


def _config_error(section: dict) -> str:
    with pytest.raises(ConfigError) as err:
        from_dict({"model": section})
    message = str(err.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    ("section", "keys"),
    [
        ({"pos": "rotary", "embed_dim": 24, "heads": [4, 8]}, ["model.pos", "model.heads[0]"]),
        ({"pos": "sincos", "embed_dim": 18, "heads": [2, 2]}, ["model.pos", "model.embed_dim"]),
        ({"memory": {"dim": 30, "heads": 8}}, ["model.memory.dim", "model.memory.heads"]),
        ({"memory": {"read": "dot"}}, ["model.memory.read"]),
        ({"memory": {"fusion": "add"}}, ["model.memory.fusion"]),
        ({"dat": {"sampling": "local"}}, ["model.dat.sampling"]),
        ({"head": "tanh"}, ["model.head"]),
        ({"skips": "maybe"}, ["model.skips"]),
        ({"pos": "learned"}, ["model.pos"]),
    ],
)
def test_invalid_option_combinations_are_one_config_line(section: dict, keys: list[str]) -> None:
    message = _config_error({"name": MEM, **section})
    assert all(key in message for key in keys), message


# model.residual: forecast = last input frame + learned change, on every model and both heads
RESIDUAL = [
    ("convlstm", {"residual": True}),
    ("swinlstm", {"residual": True}),
    ("swinlstm", {"residual": True, "head": "linear"}),
    (MEM, {"residual": True}),
    (MEM, {"residual": True, "head": "linear"}),
]
RESIDUAL_IDS = [f"{name}-{overrides}" for name, overrides in RESIDUAL]
DRIFT = 1  # pixels per step of the moving clip, times (2, 1)


def moving_clip() -> torch.Tensor:
    """(2, IN_LEN + OUT_LEN, 1, 64, 64): a zero-dominant rain cell (a Gaussian bump, 0 beyond its edge)
    drifting (2, 1) pixels and intensifying each step, so persistence is wrong and a residual model has
    a change to learn."""
    yy, xx = torch.meshgrid(
        torch.arange(SIDE, dtype=torch.float32), torch.arange(SIDE, dtype=torch.float32), indexing="ij"
    )
    frames = []
    for t in range(IN_LEN + OUT_LEN):
        r2 = (yy - 20 - 2 * t * DRIFT) ** 2 + (xx - 24 - t * DRIFT) ** 2
        frames.append(torch.where(r2 < 100, (0.3 + 0.12 * t) * torch.exp(-r2 / 40), torch.zeros(())))
    clip = torch.stack(frames)[None, :, None]  # (1, T, 1, H, W)
    return torch.cat([clip, clip.flip(-1)])


@pytest.mark.parametrize(("name", "overrides"), RESIDUAL, ids=RESIDUAL_IDS)
def test_a_fresh_residual_model_forecasts_persistence(name: str, overrides: dict) -> None:
    model = build(name, overrides).eval()
    clips = zero_dominant("sample")
    x = clips[:, :IN_LEN]
    with torch.no_grad():
        pred = model(x, OUT_LEN)
    assert torch.equal(pred, x[:, -1:].expand_as(pred))  # exactly the last input frame at every lead


@pytest.mark.parametrize(("name", "overrides"), RESIDUAL, ids=RESIDUAL_IDS)
def test_residual_gives_finite_bounded_gradients_on_zero_dominant_input(name: str, overrides: dict) -> None:
    model = build(name, overrides)
    clips = moving_clip()
    for phase in (1, 2) if model.uses_memory else (2,):
        model.zero_grad(set_to_none=True)
        loss = step_loss(model, clips, phase)
        loss.backward()
        norm = grad_norm(model)
        assert torch.isfinite(loss) and math.isfinite(norm) and 0 < norm < 100, (phase, norm)
        unused = [n for n, p in model.named_parameters() if p.grad is None]
        assert unused == model.unused_parameters(phase)
    # all-zero input: persistence is exact, so the loss and every gradient are finite zeros
    model.zero_grad(set_to_none=True)
    loss = step_loss(model, zero_dominant("zeros"), 2)
    loss.backward()
    assert loss.item() == 0.0 and grad_norm(model) == 0.0


@pytest.mark.slow
@pytest.mark.parametrize(("name", "overrides"), RESIDUAL, ids=RESIDUAL_IDS)
def test_residual_learns_a_fixed_clip(name: str, overrides: dict) -> None:
    """Starting from exact persistence, 16 AdamW steps on one fixed drifting, intensifying cell.

    ConvLSTM gets below persistence (measured 0.77x). The Swin models (tiny config) learn too, but in 16 steps they
    only recover from the first steps' jolt (every output weight starts moving at once and spreads a
    change over the dry frame; measured: 1.1-2x persistence after step 1) and stay above persistence
    on this toy clip, so for them the test asserts steady learning: the final loss is well below the
    loss after the first step. (On the real sample they do beat persistence: README, Results.)
    """
    model = build(name, overrides)
    clips = moving_clip()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)

    def inference_loss() -> float:
        with torch.no_grad():
            return step_loss(model.eval(), clips, phase=2).item()

    persistence = (clips[:, IN_LEN:] - clips[:, IN_LEN - 1 : IN_LEN]).abs().mean().item()
    assert inference_loss() == pytest.approx(persistence, rel=1e-6)
    losses = []
    for _ in range(16):
        model.train()
        for phase in (1, 2) if model.uses_memory else (2,):
            optimizer.zero_grad(set_to_none=True)
            step_loss(model, clips, phase).backward()
            optimizer.step()
        losses.append(inference_loss())
    assert all(math.isfinite(v) for v in losses)
    if name == "convlstm":
        assert losses[-1] < 0.85 * persistence, (persistence, losses)  # measured: 0.77x
    else:
        assert losses[-1] < 0.9 * losses[0], (persistence, losses)


def test_residual_is_a_validated_params_key() -> None:
    assert from_dict({"model": {"residual": True}}).model.residual is True
    with pytest.raises(ConfigError, match="model.residual"):
        from_dict({"model": {"residual": "maybe"}})


def test_every_model_combination_of_the_search_space_is_valid_or_refused(repo_root) -> None:  # type: ignore[no-untyped-def]
    """The categorical model.* choices of params.yaml's search space, in every combination, with each position
    encoding: the model section validates (frame size included) or is refused with a message naming model keys.
    (That a refusal is one config line is tested above; ModelConfig directly keeps this to a few seconds.)"""
    import copy
    import itertools

    import yaml
    from pydantic import ValidationError

    params = yaml.safe_load((repo_root / "params.yaml").read_text())
    space = [d for d in params["search"]["space"] if d["key"].startswith("model.") and d["type"] == "categorical"]
    space.append({"key": "model.pos", "choices": ["relative", "rotary"]})
    assert len(space) >= 4
    side = params["data"]["synthetic"]["size"] // params["windows"]["downsample"]
    valid = 0
    for values in itertools.product(*(d["choices"] for d in space)):
        section = copy.deepcopy(params["model"])
        for d, value in zip(space, values, strict=True):
            node = section
            *parents, leaf = d["key"].split(".")[1:]
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value
        try:
            ModelConfig(**section).check_frame_size(side, side)
            valid += 1
        except (ValidationError, ValueError) as err:
            assert "model." in str(err), str(err)
    assert valid > 0
