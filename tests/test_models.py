"""Specification of the model zoo: shapes, gradients, the two memory phases, precision, compile, DDP, config errors."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from pydantic import ValidationError
from torch.nn.parallel import DistributedDataParallel

import models
from models.blocks import WindowAttention
from models.config import ModelConfig
from models.dat import DeformableWindowAttention
from models.summary import main as summary_main
from pipeline.config import from_dict
from pipeline.errors import ConfigError

NAMES = ["convlstm", "swinlstm", "datswinlstm_memory"]

# small enough for CPU tests, but every structural feature present (2 stages, shifted windows, groups, memory);
# frames are multiples of patch 4 x window 2 x 2^2 stages = 32
TINY = dict(
    embed_dim=16,
    patch_size=4,
    window_size=2,
    depths_down=[2, 1],
    depths_up=[1, 2],
    heads=[2, 4],
    drop_path=0.0,
    convlstm={"hidden": [8, 8]},
    memory={"slots": 8, "dim": 16},
)


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):  # type: ignore[no-untyped-def]
    """Tiny models are dispatch-bound: one intra-op thread is as fast, and immune to a busy machine."""


def tiny(name: str, **overrides: object) -> ModelConfig:
    return ModelConfig(name=name, **{**TINY, **overrides})


def make(name: str, seed: int = 0, **overrides: object) -> models.base.Forecaster:
    torch.manual_seed(seed)
    return models.build(tiny(name, **overrides))


def clip(batch: int, frames: int, height: int = 32, width: int = 32, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, frames, 1, height, width, generator=generator)


# ---------------------------------------------------------------- registry
def test_build_makes_every_registered_model() -> None:
    assert models.available() == NAMES
    for name in NAMES:
        model = models.build(tiny(name))
        assert isinstance(model, models.base.Forecaster)
        assert type(model).__module__ == f"models.{name}"


def test_build_rejects_an_unregistered_name_naming_the_key() -> None:
    cfg = ModelConfig.model_construct(**{**ModelConfig().model_dump(), "name": "unet"})
    with pytest.raises(ValueError, match=r"model\.name"):
        models.build(cfg)


def test_register_refuses_a_duplicate_name() -> None:
    with pytest.raises(ValueError, match="registered twice"):
        models.register("swinlstm")(object)


# ------------------------------------------------------------------ shapes
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(("height", "width", "out_len"), [(32, 32, 1), (64, 96, 3), (96, 64, 12)])
def test_output_has_the_requested_shape_and_is_finite(name: str, height: int, width: int, out_len: int) -> None:
    model = make(name).eval()
    x = clip(2, 3, height, width)
    with torch.no_grad():
        y = model(x, out_len)
    assert y.shape == (2, out_len, 1, height, width)
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("name", NAMES)
def test_default_config_maps_a_default_sized_clip(name: str) -> None:
    cfg = ModelConfig(name=name)
    model = models.build(cfg).eval()
    with torch.no_grad():
        y = model(clip(1, 3, 128, 128), 2)
    assert y.shape == (1, 2, 1, 128, 128)
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("name", ["swinlstm", "datswinlstm_memory"])
@pytest.mark.parametrize("patch", [1, 2, 3, 4, 8])
def test_pixel_head_restores_the_frame_for_any_patch_size(name: str, patch: int) -> None:
    cfg = tiny(name, patch_size=patch, window_size=2)
    side = cfg.spatial_multiple() * 2  # 2 * patch * window 2 * 2^2
    model = models.build(cfg).eval()
    with torch.no_grad():
        y = model(clip(1, 2, side, side + cfg.spatial_multiple()), 2)
    assert y.shape == (1, 2, 1, side, side + cfg.spatial_multiple())


@pytest.mark.parametrize("name", NAMES)
def test_a_frame_size_the_config_forbids_is_refused(name: str) -> None:
    model = make(name)
    with pytest.raises(ValueError, match=r"not divisible by model\.patch_size"):
        model(clip(1, 2, 30, 32), 1)


def test_single_input_frame_is_enough_for_every_model() -> None:
    for name in NAMES:
        y = make(name)(clip(1, 1), 2, memory_x=clip(1, 3), phase=1)
        assert y.shape == (1, 2, 1, 32, 32)


# --------------------------------------------------------------- gradients
def _loss(model: torch.nn.Module, phase: int, seed: int = 1) -> torch.Tensor:
    x, long = clip(2, 3, seed=seed), clip(2, 5, seed=seed)
    return (model(x, 2, memory_x=long, phase=phase) - long[:, 3:]).pow(2).mean()


@pytest.mark.parametrize("phase", [1, 2])
@pytest.mark.parametrize("name", NAMES)
def test_gradients_reach_every_parameter_the_phase_uses(name: str, phase: int) -> None:
    model = make(name)
    _loss(model, phase=phase).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == model.unused_parameters(phase)


def test_phase2_gives_the_bank_and_context_encoder_no_gradient_even_when_they_require_grad() -> None:
    model = make("datswinlstm_memory")
    assert all(p.requires_grad for p in model.memory_parameters())
    _loss(model, phase=2).backward()
    assert model.memory.bank.grad is None
    others = [n for n, p in model.named_parameters() if p.grad is None]
    assert others == model.phase2_unused_parameters()
    assert others[-1] == "memory.bank" and all(n.startswith("context_encoder.") for n in others[:-1])
    assert len(others) == 1 + len(list(model.context_encoder.parameters()))


def test_phase1_leaves_the_matching_encoder_without_gradient() -> None:
    model = make("datswinlstm_memory")
    _loss(model, phase=1).backward()
    assert all(p.grad is None for p in model.matching_encoder.parameters())
    assert model.memory.bank.grad is not None


def test_a_shared_encoder_serves_both_phases() -> None:
    model = make("datswinlstm_memory", memory={"slots": 8, "dim": 16, "encoders": "shared"})
    assert model.matching_encoder is None and model.encoder(1) is model.encoder(2)
    assert model.unused_parameters(1) == [] and model.unused_parameters(2) == ["memory.bank"]


def _adamw_step(model: torch.nn.Module, phase: int) -> torch.Tensor:
    """One AdamW step (with weight decay) in the given phase; returns the bank before the step."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    before = model.memory.bank.detach().clone()
    optimizer.zero_grad(set_to_none=True)
    _loss(model, phase).backward()
    optimizer.step()
    return before


def test_phase2_optimizer_step_leaves_the_bank_unchanged() -> None:
    model = make("datswinlstm_memory")
    before = _adamw_step(model, phase=2)
    assert torch.equal(model.memory.bank, before)


def test_phase1_optimizer_step_changes_the_bank() -> None:
    model = make("datswinlstm_memory")
    before = _adamw_step(model, phase=1)
    assert not torch.allclose(model.memory.bank, before)


def test_two_phase_recipe_trains_the_bank_only_in_phase1() -> None:
    """The docstring's recipe: one AdamW, phase 1 then phase 2 on each batch."""
    model = make("datswinlstm_memory")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for step in range(2):
        for phase in (1, 2):
            before = model.memory.bank.detach().clone()
            optimizer.zero_grad(set_to_none=True)
            _loss(model, phase, seed=step).backward()
            optimizer.step()
            assert torch.equal(model.memory.bank, before) == (phase == 2)


def test_set_memory_trainable_toggles_only_the_phase1_parameters() -> None:
    model = make("datswinlstm_memory")
    model.set_memory_trainable(False)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert sorted(frozen) == sorted(model.unused_parameters(2))  # the bank and the context encoder
    model.set_memory_trainable(True)
    assert all(p.requires_grad for p in model.parameters())


def test_phase1_needs_the_long_clip() -> None:
    model = make("datswinlstm_memory")
    with pytest.raises(ValueError, match="memory_x"):
        model(clip(1, 3), 2, phase=1)
    with pytest.raises(ValueError, match="fewer"):
        model(clip(1, 3), 2, memory_x=clip(1, 2), phase=1)
    with pytest.raises(ValueError, match="phase"):
        model(clip(1, 3), 2, phase=3)


@pytest.mark.parametrize("long_len", [3, 5, 9])
def test_phase1_accepts_a_long_clip_of_any_length(long_len: int) -> None:
    y = make("datswinlstm_memory")(clip(1, 3), 2, memory_x=clip(1, long_len), phase=1)
    assert y.shape == (1, 2, 1, 32, 32)


def test_phase2_ignores_memory_x() -> None:
    model = make("datswinlstm_memory").eval()
    x = clip(1, 3)
    with torch.no_grad():
        assert torch.equal(model(x, 2), model(x, 2, memory_x=clip(1, 7, seed=5), phase=2))


@pytest.mark.parametrize("name", ["convlstm", "swinlstm"])
def test_baselines_ignore_memory_x_and_phase(name: str) -> None:
    model = make(name).eval()
    x = clip(1, 3)
    with torch.no_grad():
        assert torch.equal(model(x, 2), model(x, 2, memory_x=clip(1, 7, seed=5), phase=1))
    assert list(model.memory_parameters()) == []
    assert model.phase2_unused_parameters() == []


# -------------------------------------------------------------- attention
def test_deformable_attention_with_zero_offsets_is_swin_window_attention() -> None:
    torch.manual_seed(0)
    dim, heads, window = 16, 4, 4
    x = torch.randn(2, 8, 12, dim)
    for shifted in (False, True):
        swin = WindowAttention(dim, heads, window, shifted)
        dat = DeformableWindowAttention(dim, heads, window, shifted, groups=2, offset_range=2.0, offset_kernel=3)
        with torch.no_grad():
            dat.q.weight.copy_(swin.qkv.weight[:dim])
            dat.q.bias.copy_(swin.qkv.bias[:dim])
            dat.kv.weight.copy_(swin.qkv.weight[dim:])
            dat.kv.bias.copy_(swin.qkv.bias[dim:])
            dat.proj.load_state_dict(swin.proj.state_dict())
            dat.bias_table.copy_(swin.bias_table.T.reshape(heads, 2 * window - 1, 2 * window - 1))
            dat.offset_head.weight.zero_()
        torch.testing.assert_close(dat(x), swin(x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("attention", ["swin", "dat"])
@pytest.mark.parametrize("shifted", [False, True])
def test_cpu_training_attention_path_matches_sdpa(attention: str, shifted: bool) -> None:
    """With autograd on, CPU attention is written out (the fast SDPA kernel refuses a bias that needs a
    gradient); without, it is F.scaled_dot_product_attention. Same numbers either way."""
    torch.manual_seed(0)
    if attention == "swin":
        module = WindowAttention(16, 4, 4, shifted)
    else:
        module = DeformableWindowAttention(16, 4, 4, shifted, groups=2, offset_range=2.0, offset_kernel=3)
        with torch.no_grad():
            module.offset_head.weight.normal_(std=0.5)  # keys really move
    x = torch.randn(3, 8, 12, 16)
    written_out = module(x)
    assert written_out.requires_grad
    with torch.no_grad():
        sdpa = module(x)
    torch.testing.assert_close(written_out.detach(), sdpa, atol=1e-6, rtol=1e-5)


def test_up_path_runs_one_level_below_the_down_path() -> None:
    """As in the paper and the public SwinLSTM_D.py: merge after every down stage, expand after every up stage."""
    cfg = tiny("datswinlstm_memory")
    model = models.build(cfg)
    backbone, D, S = model.backbone, cfg.embed_dim, cfg.stages
    assert [cell.mix.out_features for cell in backbone.down] == [D * 2**i for i in range(S)]
    assert [cell.mix.out_features for cell in backbone.up] == [D * 2 ** (S - j) for j in range(S)]
    assert len(backbone.merge) == len(backbone.expand) == S
    # the memory query lands on the bottom grid; the reference fusion brings it to the deepest down cell
    for phase in (1, 2):
        query = model.encoder(phase)(clip(1, 3, 64, 96))
        assert query.shape[1:3] == (64 // (cfg.patch_size * 2**S), 96 // (cfg.patch_size * 2**S))
    assert backbone.fusion_site == "down" and backbone.deep_fusion.fuse.out_features == D * 2 ** (S - 1)
    gated = models.build(tiny("datswinlstm_memory", memory={"slots": 8, "dim": 16, "fusion": "gated"}))
    assert gated.backbone.fusion_site == "up" and gated.backbone.deep_fusion.proj.out_features == D * 2**S


@pytest.mark.parametrize("attention", ["swin", "dat"])
def test_shifted_windows_do_not_mix_tokens_across_the_wrapped_seam(attention: str) -> None:
    torch.manual_seed(0)
    if attention == "swin":
        module = WindowAttention(8, 2, 4, shifted=True)
    else:
        module = DeformableWindowAttention(8, 2, 4, True, groups=1, offset_range=0.4, offset_kernel=3)
    x = torch.randn(1, 8, 8, 8, requires_grad=True)
    # after the roll, token (0, 0) sits in the same window as (7, 7) but in another region
    module(x)[0, 7, 7].sum().backward()
    assert x.grad[0, 0, 0].abs().max() < 1e-30  # masked: weight exp(-100), not a neighbour
    assert x.grad[0, 7, 7].abs().sum() > 0


def test_deformable_offsets_move_the_keys() -> None:
    torch.manual_seed(0)
    module = DeformableWindowAttention(8, 2, 4, False, groups=2, offset_range=2.0, offset_kernel=3)
    x = torch.randn(1, 8, 8, 8)
    plain = module(x)
    with torch.no_grad():
        module.offset_head.weight.normal_(std=1.0)
    assert not torch.allclose(module(x), plain)


# --------------------------------------------------------- precision, compile, DDP
@pytest.mark.parametrize("name", NAMES)
def test_bf16_autocast_on_cpu_is_finite_and_differentiable(name: str) -> None:
    model = make(name)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = _loss(model, phase=1)
    assert torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_torch_compile_fullgraph_matches_eager(name: str) -> None:
    """fullgraph=True fails on any graph break, so this also proves no .item() / data-dependent branch."""
    model = make(name, embed_dim=8, depths_down=[1, 1], depths_up=[1, 1], convlstm={"hidden": [4]})
    x, long = clip(1, 2), clip(1, 3)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    y = compiled(x, 2, memory_x=long, phase=1)  # phase 1: the path with the most to trace
    torch.testing.assert_close(y, model(x, 2, memory_x=long, phase=1), atol=1e-4, rtol=1e-4)
    y.pow(2).mean().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == model.unused_parameters(1)


@pytest.fixture
def process_group(tmp_path):  # type: ignore[no-untyped-def]
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("name", NAMES)
def test_two_phase_training_runs_under_ddp(name: str, process_group: None) -> None:
    model = make(name)
    ddp = DistributedDataParallel(model, find_unused_parameters=bool(model.phase2_unused_parameters()))
    optimizer = torch.optim.AdamW(ddp.parameters(), lr=1e-3, weight_decay=0.1)
    phases = (1, 2) if model.uses_memory else (2,)
    for step in range(2):
        for phase in phases:
            before = copy.deepcopy(model.state_dict())
            optimizer.zero_grad(set_to_none=True)
            _loss(ddp, phase, seed=step).backward()
            optimizer.step()
            if model.uses_memory:
                assert torch.equal(model.memory.bank, before["memory.bank"]) == (phase == 2)


# --------------------------------------------------------------- config errors
def _config_error(model_section: dict[str, object]) -> str:
    with pytest.raises(ConfigError) as err:
        from_dict({"model": model_section})
    message = str(err.value)
    assert "\n" not in message
    return message


def test_unknown_model_name_is_a_config_error_naming_the_key() -> None:
    message = _config_error({"name": "unet"})
    assert "model.name" in message and "swinlstm" in message


def test_embed_dim_not_divisible_by_heads_names_both_keys() -> None:
    message = _config_error({"name": "swinlstm", "embed_dim": 30, "heads": [4, 8]})
    assert "model.embed_dim" in message and "model.heads[0]" in message


def test_frame_not_divisible_by_patch_window_stages_names_the_keys() -> None:
    # default frames are 128: 128 % (8 * 3 * 2^2) != 0
    message = _config_error({"name": "swinlstm", "patch_size": 8, "window_size": 3})
    assert "model.patch_size" in message and "model.window_size" in message and "= 96" in message


def test_convlstm_frame_constraint_is_the_patch_size_only() -> None:
    cfg = ModelConfig(name="convlstm", patch_size=3)
    assert cfg.spatial_multiple() == 3
    message = _config_error({"name": "convlstm", "patch_size": 3})
    assert "model.patch_size = 3" in message and "model.window_size" not in message


def test_dat_groups_must_divide_heads() -> None:
    message = _config_error({"name": "datswinlstm_memory", "heads": [3, 6], "embed_dim": 24})
    assert "model.heads[0]" in message and "model.dat.groups" in message


def test_stage_lists_must_agree_in_length() -> None:
    assert "model.depths_up" in _config_error({"depths_up": [2]})
    assert "model.heads" in _config_error({"heads": [4]})


def test_unknown_model_key_is_refused() -> None:
    assert "model.embed" in _config_error({"embed": 16})


def test_spatial_multiple_formula() -> None:
    assert (
        ModelConfig(
            name="swinlstm", patch_size=4, window_size=4, depths_down=[2, 2], depths_up=[2, 2]
        ).spatial_multiple()
        == 64
    )
    cfg = ModelConfig(
        name="swinlstm", patch_size=2, window_size=8, depths_down=[1, 1, 1], depths_up=[1, 1, 1], heads=[1, 2, 4]
    )
    assert cfg.spatial_multiple() == 2 * 8 * 8
    assert ModelConfig().spatial_multiple() == 128  # the default params: 8 * 4 * 2^2, the default 128 frames
    with pytest.raises(ValidationError):
        ModelConfig(name="swinlstm", embed_dim=10, heads=[4, 8])


# ------------------------------------------------------------------- summary
def test_summary_prints_and_writes_a_row_per_model(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "PARAMS.md"
    assert summary_main(["--markdown", str(out)]) == 0
    printed = capsys.readouterr().out
    for name in NAMES:
        assert f"| {name} | " in printed
    assert printed in out.read_text()


def test_committed_params_md_is_current(repo_root, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    # models/PARAMS.md is generated; a default changed in params.yaml must be regenerated with it.
    from pipeline.summary import main as pipeline_summary

    out = tmp_path / "PARAMS.md"
    monkeypatch.chdir(repo_root)  # the header names the params file as given: `params.yaml`
    pipeline_summary(["--markdown", str(out)])
    fresh = [line for line in out.read_text().splitlines() if not line.startswith("Written by")]
    committed = [line for line in (repo_root / "models" / "PARAMS.md").read_text().splitlines()
                 if not line.startswith("Written by")]  # fmt: skip
    assert fresh == committed, "models/PARAMS.md is stale: run python -m pipeline.summary --markdown models/PARAMS.md"


def test_summary_counts_a_preset(repo_root, capsys) -> None:  # type: ignore[no-untyped-def]
    assert summary_main(["--preset", str(repo_root / "presets" / "reference_sevir.yaml")]) == 0
    printed = capsys.readouterr().out
    assert "embed_dim 128, patch_size 4" in printed and "memory 100 x 512" in printed
    row = next(line for line in printed.splitlines() if line.startswith("| datswinlstm_memory |"))
    assert int(row.split("|")[2].replace(",", "")) > 10_000_000


def test_summary_refuses_a_bad_preset_in_one_line(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  memory:\n    read: dot\n")
    assert summary_main(["--preset", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "model.memory.read" in err


def test_pipeline_summary_reads_params(repo_root, capsys) -> None:  # type: ignore[no-untyped-def]
    from pipeline.summary import main as pipeline_summary

    pipeline_summary(["--params", str(repo_root / "params.yaml")])
    assert "| datswinlstm_memory | " in capsys.readouterr().out


def test_models_import_nothing_from_pipeline(repo_root) -> None:  # type: ignore[no-untyped-def]
    import ast

    offenders = []
    for path in sorted((repo_root / "models").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n == "pipeline" or n.startswith("pipeline.")]
    assert offenders == []
