"""Model presets (reference SEVIR, small GPU) through `python -m pipeline.preset`: valid presets, -S overrides that
reproduce them, one-line errors; the reference preset held to the published code key by key; both summaries agree."""

from __future__ import annotations

import ast
import datetime as dt
import io
import re
import shlex
import subprocess
import sys
import tokenize
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from models.config import ModelConfig
from pipeline.config import Config, from_dict, load
from pipeline.preset import main as preset_main
from pipeline.preset import merge, overrides, preset_config

PRESETS = ["reference_sevir.yaml", "small_gpu.yaml"]

# The published configuration, key by key, with where in zzcd1/datswinlstm_memory each value comes from
# (configs/config.py = config.py; models/DATSwinLSTM_D_Memory.py = model.py; models/dat_blocks.py = dat.py;
# models/MotionSqueeze.py = ms.py; run_sevir_multiGpu_distributedSampler.py = train.py, the uncommented
# second half). Every model option must be here: a new one is a failure until its published value is added.
REFERENCE_OPTIONS: dict[str, Any] = {
    "model.name": "datswinlstm_memory",  # train.py: Memory(args, memory_channel_size=512, ...)
    "model.in_channels": 1,  # config.py --input_channels 1
    "model.patch_size": 4,  # config.py --patch_size 4; train.py args patch_size=4
    "model.embed_dim": 128,  # config.py --embed_dim 128; train.py args embed_dim=128
    "model.window_size": 4,  # config.py --window_size 4
    "model.depths_down": [3, 2],  # config.py --depths_down [3, 2]
    "model.depths_up": [3, 2],  # config.py --depths_up [2, 3]; model.py UpSample takes depths_up[num_layers-1-i]
    "model.heads": [4, 8],  # config.py --heads_number [4, 8]
    "model.mlp_ratio": 4.0,  # model.py DownSample/UpSample mlp_ratio=4. passed to SwinLSTMCell -> DATSwinTransformer
    "model.dropout": 0.0,  # config.py --drop_rate 0., --attn_drop_rate 0.
    "model.drop_path": 0.1,  # config.py --drop_path_rate 0.1; model.py DownSample/UpSample drop_path_rate=0.1
    "model.skips": False,  # model.py SwinLSTM.forward: Downsample then Upsample, no skip connections
    "model.head": "sigmoid",  # model.py UpSample.forward: torch.sigmoid(self.Unembed(x))
    "model.residual": False,  # model.py Memory.forward: outputs.append(output), the head's frame itself
    "model.motion": False,  # the published code predicts frames directly: no flow head, no warp
    "model.prior.kind": "none",  # no motion prior: nothing is advected
    "model.prior.pool": 2,  # unused with kind none: the ModelConfig defaults
    "model.prior.radius": 6,
    "model.prior.lag": 2,
    "model.prior.pairs": 3,
    "model.prior.smooth": 15,
    "model.prior.patch": 9,
    "model.inflow": "edge",  # unused with motion false: nothing is advected (the ModelConfig default)
    "model.pos": "relative",  # model.py SwinLSTMCell: use_pe=True, dwc_pe=False, fixed_pe=False -> dat.py rpe_table
    "model.dat.groups": 4,  # model.py SwinLSTMCell n_group=4
    "model.dat.sampling": "window",  # dat.py DATSwinDAttention.forward samples the (window x window) map
    "model.dat.offset_range": 1.0,  # dat.py offset.tanh() * 1 / (Hk - 1) * offset_range_factor 2, align_corners
    "model.dat.offset_kernel": 3,  # dat.py self.kk = 3 when q_h <= 12 (window 4)
    "model.memory.slots": 100,  # model.py Memory memory_slot_size=100
    "model.memory.dim": 512,  # train.py Memory(args, memory_channel_size=512)
    "model.memory.corr_radius": 3,  # ms.py MS: patchs = [7, 7, 7, 7] (a 7 x 7 window)
    "model.memory.encoders": "separate",  # model.py motion_context_encoder_2d (phase 1), motion_encoder_2d (phase 2)
    "model.memory.read": "attention",  # model.py Memory.attention_block = Transformer(...)
    "model.memory.heads": 8,  # model.py Transformer(dim=memory_size, depth=1, heads=8, dim_head=64)
    "model.memory.fusion": "reference",  # model.py Memory.forward: states_down[-1][1] = fuse(cat(c, g * m))
    "windows.in_len": 12,  # train.py training_step: x = batch[:, :12]
    "windows.out_len": 24,  # train.py args out_len=24 (Memory.target_len); seq_len 36
    "windows.stride": 12,  # train.py SEVIRLightningDataModule stride 12
    "windows.frame_step": 1,  # train.py dataset sevir: interval_real_time 5
    "windows.memory_len": None,  # train.py phase 1: memory_x = batch, the whole 36-frame sample
    "windows.downsample": 1,  # train.py img_height = img_width = 384
    "data.split.train_end": dt.datetime(2019, 1, 1),  # train.py train_val_split_date (2019, 1, 1)
    "data.split.val_end": dt.datetime(2019, 6, 1),  # train.py train_test_split_date (2019, 6, 1)
    "train.oversample.enabled": False,  # train.py: a plain DataLoader over the windows
    "train.augment.noise_std": 0.0,  # train.py: no augmentation
    "train.augment.mask_prob": 0.0,
    "train.augment.time_shift": 0,
}
# train.py training_step / configure_optimizers, the same optimiser for both steps of a batch
for _phase in ("phase1", "phase2"):
    REFERENCE_OPTIONS |= {
        f"train.{_phase}.lr": 1e-3,  # optim.Adam(self.parameters(), lr=1e-3)
        f"train.{_phase}.weight_decay": 0.0,  # Adam, no weight_decay
        f"train.{_phase}.beta1": 0.9,  # Adam's default betas
        f"train.{_phase}.beta2": 0.999,
        f"train.{_phase}.schedule": "constant",  # ReduceLROnPlateau never stepped: automatic_optimization=False
        f"train.{_phase}.warmup_frac": 0.0,
        f"train.{_phase}.grad_clip": 0.0,  # pl.Trainer(...) has no gradient_clip_val
        f"train.{_phase}.grad_accum": 1,  # optimizer.step() after every manual_backward
        f"train.{_phase}.l1_weight": 1.0,  # F.l1_loss(y_combined, y_hat)
        f"train.{_phase}.l2_weight": 0.0,
        f"train.{_phase}.ssim_weight": 0.0,
        f"train.{_phase}.recon_weight": 0.0,
        f"train.{_phase}.csi_weight": 0.0,  # no soft-CSI term: the loss is the L1 alone
        f"train.{_phase}.balanced": False,  # loss.mean(), no intensity weights
        f"train.{_phase}.align": True,  # phase 1 step, then phase 2 step, on the same batch
        f"train.{_phase}.ema_decay": 0.0,  # no EMA in the script
        f"train.{_phase}.best_key": "val.csi.16",  # EarlyStopping(monitor='val_csi_16', mode='max', patience=30)
        f"train.{_phase}.early_stop_patience": 30,
    }
# the small-GPU preset is the reference scaled down: these keys are its sizes, every other one is the reference's
SIZE_KEYS = {"model.embed_dim", "model.depths_down", "model.depths_up", "model.heads", "model.memory.dim",
             "windows.in_len", "windows.out_len"}  # fmt: skip
# model options of another model: not part of the memory model's published configuration
OTHER_MODELS = ("model.convlstm.",)
# a comment that marks an option as differing between this project and the published code
MARKS = re.compile(r"\bours\b|\bour addition\b|\breference\b|\bpublished\b|\bref\b", re.IGNORECASE)


def _apply(params: dict, args: list[str]) -> dict:
    """Apply `-S key=value` pairs the way dvc does: the value parsed as YAML (the override grammar's subset)."""
    out = yaml.safe_load(yaml.safe_dump(params))
    for flag, pair in zip(args[::2], args[1::2], strict=True):
        assert flag == "-S"
        key, value = pair.split("=", 1)
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    return out


@pytest.mark.parametrize("name", PRESETS)
def test_preset_overrides_rebuild_the_preset(repo_root, name: str) -> None:
    preset = repo_root / "presets" / name
    params = repo_root / "params.yaml"
    args, _ = overrides(preset, params)
    base = yaml.safe_load(params.read_text())
    expected = from_dict(merge(base, yaml.safe_load(preset.read_text())))
    assert from_dict(_apply(base, args)) == expected
    assert all(" " not in a for a in args)  # survives $(...) word splitting


def test_reference_preset_is_the_published_configuration(repo_root) -> None:
    cfg = from_dict(merge(yaml.safe_load((repo_root / "params.yaml").read_text()),
                          yaml.safe_load((repo_root / "presets" / "reference_sevir.yaml").read_text())))  # fmt: skip
    m = cfg.model
    assert (m.patch_size, m.embed_dim, m.window_size, m.heads) == (4, 128, 4, [4, 8])
    assert (m.depths_down, list(reversed(m.depths_up))) == ([3, 2], [2, 3])  # reference order: [2, 3]
    assert (m.memory.slots, m.memory.dim) == (100, 512)
    assert (m.memory.read, m.memory.fusion, m.memory.encoders, m.skips, m.head) == (
        "attention", "reference", "separate", False, "sigmoid",
    )  # fmt: skip
    assert cfg.data.synthetic.size // cfg.windows.downsample == 384


def test_the_command_prints_one_line_of_overrides(repo_root) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "pipeline.preset", "presets/reference_sevir.yaml"],
        cwd=repo_root, capture_output=True, text=True, check=True,
    )  # fmt: skip
    args = shlex.split(out.stdout)
    assert out.stdout.count("\n") == 1 and args[:2] == ["-S", "data.synthetic.size=384"]
    assert "model.depths_up=[3,2]" in args


def test_an_invalid_preset_is_one_line_and_prints_no_overrides(tmp_path, repo_root, capsys) -> None:
    from pipeline.cli import run_stage

    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  pos: rotary\n  embed_dim: 24\n")
    code = run_stage(preset_main, [str(bad), "--params", str(repo_root / "params.yaml")])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    assert captured.err.count("\n") == 1 and "model.pos" in captured.err


def test_params_yaml_itself_is_valid(repo_root) -> None:
    load(repo_root / "params.yaml")


# ------------------------------------------------------------ the published configuration, key by key
def _value(cfg: BaseModel, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def _leaves(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out |= _leaves(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def _sections(model: type[BaseModel], prefix: str) -> dict[str, str]:
    """{section class name: dotted prefix} for ``model`` and every nested section of it."""
    out = {model.__name__: prefix}
    for name, field in model.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            out |= _sections(field.annotation, f"{prefix}{name}.")
    return out


def _options(model: type[BaseModel], prefix: str) -> list[str]:
    """Every leaf option of ``model``, dotted."""
    out = []
    for name, field in model.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            out += _options(field.annotation, f"{prefix}{name}.")
        else:
            out.append(f"{prefix}{name}")
    return out


def _marked_model_options(source: str) -> dict[str, str]:
    """{dotted model option: its comment} for the fields of models/config.py whose comment marks ours / the reference."""
    comments: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string
    code_lines = {
        i + 1 for i, line in enumerate(source.splitlines()) if line.strip() and not line.strip().startswith("#")
    }
    prefixes = _sections(ModelConfig, "model.")
    out = {}
    for node in ast.parse(source).body:
        if not isinstance(node, ast.ClassDef) or node.name not in prefixes:
            continue
        for stmt in node.body:
            if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
                continue
            lines = list(range(stmt.lineno, (stmt.end_lineno or stmt.lineno) + 1))
            above = stmt.lineno - 1
            while above in comments and above not in code_lines:  # the comment block right above the field
                lines.append(above)
                above -= 1
            text = " ".join(comments.get(i, "") for i in sorted(lines))
            if MARKS.search(text):
                out[prefixes[node.name] + stmt.target.id] = text
    return out


def _marked_params_options(text: str) -> dict[str, str]:
    """{dotted params.yaml key: its comment} for the keys whose params.yaml comment marks ours / the reference."""
    out, stack = {}, []  # stack: (indent, key) of the enclosing mappings
    for line in text.splitlines():
        match = re.match(r"^(\s*)([A-Za-z_]\w*):(.*)$", line)
        if not match:
            continue
        indent, key, rest = len(match[1]), match[2], match[3]
        while stack and stack[-1][0] >= indent:
            stack.pop()
        dotted = ".".join([k for _, k in stack] + [key])
        stack.append((indent, key))
        comment = rest.split("#", 1)[1] if "#" in rest else ""
        if MARKS.search(comment):
            out[dotted] = comment.strip()
    return out


def _preset_config(repo_root: Path, name: str) -> Config:
    return preset_config(repo_root / "presets" / name, repo_root / "params.yaml")


@pytest.mark.parametrize("name", PRESETS)
def test_the_presets_hold_every_published_option(repo_root, name: str) -> None:
    cfg = _preset_config(repo_root, name)
    skipped = SIZE_KEYS if name == "small_gpu.yaml" else set()
    wrong = {key: {"preset": _value(cfg, key), "published": value}
             for key, value in REFERENCE_OPTIONS.items() if key not in skipped and _value(cfg, key) != value}  # fmt: skip
    assert wrong == {}, f"presets/{name} differs from the published code"


@pytest.mark.parametrize("name", PRESETS)
def test_the_presets_set_every_published_option_explicitly(repo_root, name: str) -> None:
    # explicitly: a preset that leaves a key to params.yaml runs with our default for it
    explicit = _leaves(yaml.safe_load((repo_root / "presets" / name).read_text()))
    assert [key for key in REFERENCE_OPTIONS if key not in explicit] == []


def test_every_model_option_has_its_published_value_in_the_reference_dict() -> None:
    options = [key for key in _options(ModelConfig, "model.") if not key.startswith(OTHER_MODELS)]
    missing = [key for key in options if key not in REFERENCE_OPTIONS]
    assert missing == [], (
        f"add the published value of {missing} to REFERENCE_OPTIONS and to presets/reference_sevir.yaml"
    )


def test_every_option_marked_ours_or_reference_has_its_published_value_in_the_reference_dict(repo_root) -> None:
    marked = _marked_model_options((repo_root / "models" / "config.py").read_text())
    found = {"model.skips", "model.residual", "model.memory.dim", "model.dat.offset_range"}
    assert found <= set(marked)  # the marks are found
    marked |= _marked_params_options((repo_root / "params.yaml").read_text())
    missing = {key: text for key, text in marked.items()
               if key.startswith(("model.", "train.", "windows.")) and not key.startswith(OTHER_MODELS)
               and key not in REFERENCE_OPTIONS}  # fmt: skip
    assert missing == {}, "options marked as ours / the reference's need their published value in REFERENCE_OPTIONS"


# ------------------------------------------------------------------ both summaries read a preset alike
@pytest.mark.parametrize("name", [*PRESETS, "partial"])
def test_models_summary_and_pipeline_summary_count_a_preset_alike(repo_root, tmp_path, monkeypatch, capsys,
                                                                  name: str) -> None:  # fmt: skip
    from models.summary import config_from_preset
    from models.summary import main as models_summary
    from pipeline.summary import main as pipeline_summary

    monkeypatch.chdir(repo_root)  # both read params.yaml from the working directory by default
    preset = repo_root / "presets" / name
    if name == "partial":  # a preset that sets a few model keys: the rest comes from params.yaml, for both
        preset = tmp_path / "partial.yaml"
        preset.write_text("model:\n  embed_dim: 16\n  memory:\n    dim: 32\n")
        assert config_from_preset(preset) == preset_config(preset, repo_root / "params.yaml").model
        assert models_summary(["--preset", str(preset)]) == 0
        from_models = capsys.readouterr().out
        pipeline_summary(["--preset", str(preset)])
        assert capsys.readouterr().out == from_models
    else:
        assert config_from_preset(preset) == _preset_config(repo_root, name).model
