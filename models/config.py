"""The typed ``model`` section of params.yaml (validated by pydantic).

Lives with the networks (like nanoGPT's GPTConfig) so that adding a knob to a
model touches one package. ``pipeline.config`` composes it into the full config.

Every impossible combination raises ``ValueError`` with a message that starts
with the offending key (``model.xxx``) so pipeline.config prints it as one line.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

PositiveInt = Annotated[int, Field(ge=1)]
Fraction = Annotated[float, Field(ge=0, lt=1)]

ModelName = Literal["convlstm", "swinlstm", "datswinlstm_memory"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class ConvLSTMConfig(_Section):
    """ConvLSTM encoder-forecaster (name: convlstm)."""

    hidden: Annotated[list[PositiveInt], Field(min_length=1)] = [32, 32]  # channels of each stacked cell
    kernel_size: PositiveInt = 3  # odd, so 'same' padding keeps the grid


class DATConfig(_Section):
    """Deformable window attention (name: datswinlstm_memory)."""

    groups: PositiveInt = 2  # offset groups; each shares one set of sampling points; divides every heads[i]
    # window: keys sampled inside each query's window, +-offset_range tokens, clamped to the window (the
    # reference's DAT-Swin); global: +-offset_range tokens anywhere on the map (zeros outside it)
    sampling: Literal["window", "global"] = "window"
    offset_range: Annotated[float, Field(gt=0)] = 1.0  # max |offset| in tokens (tanh-bounded); reference: 1
    offset_kernel: PositiveInt = 3  # depthwise conv kernel of the offset network, odd


class MemoryConfig(_Section):
    """Long-term motion memory (name: datswinlstm_memory)."""

    slots: PositiveInt = 100  # rows of the learnable memory bank
    dim: PositiveInt = 64  # channels of each slot (and of the motion query); reference: 512
    corr_radius: Annotated[int, Field(ge=1, le=4)] = 3  # correlation window (2r+1)^2 of the motion module; ref 3
    # separate: a context encoder reads the long clip (phase 1), a matching encoder the short input (phase 2,
    # inference), as LMC-Memory and the reference; shared: one query encoder for both
    encoders: Literal["separate", "shared"] = "separate"
    # attention: learned position embedding, self-attention over the query tokens, multi-head cross-attention
    # to the bank, feed-forward, sigmoid(LayerNorm) (the reference); cosine: softmax of cosine similarity
    read: Literal["attention", "cosine"] = "attention"
    heads: PositiveInt = 8  # heads of the attention read and of fusion cross_attention; divides memory.dim
    # reference: the deepest down cell's state c <- Linear([c; g m]) with a per-token gate g, at forecast steps;
    # gated: h + g m into the bottom up cell's hidden state, one global channel gate g; concat: h + Linear([h; m])
    # there; cross_attention: h + attention(h tokens -> memory tokens) there
    fusion: Literal["reference", "gated", "concat", "cross_attention"] = "reference"


class PriorConfig(_Section):
    """Motion prior of ``model.motion`` (models.motion.MotionPrior): a block-matching flow from the inputs."""

    kind: Literal["none", "block_matching"] = "none"  # block_matching: the forecast starts from extrapolation
    pool: PositiveInt = 2  # frames are average-pooled by this before matching (pixels per coarse pixel)
    radius: Annotated[int, Field(ge=1, le=8)] = 6  # displacements searched, coarse pixels each way
    lag: PositiveInt = 2  # frames between the matched pair; fastest motion seen = radius * pool / lag px/frame
    pairs: PositiveInt = 3  # the last N pairs of inputs, averaged
    smooth: Annotated[int, Field(ge=0)] = 15  # half-width of the flow's smoothing box, coarse pixels
    patch: Annotated[int, Field(ge=3, le=15)] = 9  # side of the neighbourhood matched, coarse pixels; odd

    @model_validator(mode="after")
    def _odd_patch(self) -> PriorConfig:
        if self.patch % 2 == 0:
            raise ValueError(f"model.prior.patch = {self.patch} must be odd (a neighbourhood centred on its pixel)")
        return self


class ModelConfig(_Section):
    name: ModelName = "datswinlstm_memory"
    in_channels: PositiveInt = 1
    embed_dim: PositiveInt = 32  # tokens' channels at the first stage; down stage i has embed_dim * 2^i
    patch_size: PositiveInt = 8  # pixels per token side (ConvLSTM: space-to-depth factor); 4 = published
    window_size: PositiveInt = 4  # attention window side, in tokens
    depths_down: Annotated[list[PositiveInt], Field(min_length=1)] = [2, 2]  # blocks per down stage, shallow first
    depths_up: Annotated[list[PositiveInt], Field(min_length=1)] = [2, 2]  # blocks per up stage, deepest first
    # attention heads per stage, shallow first: down stage i (embed_dim * 2^i channels) and up stage S-1-i
    # (embed_dim * 2^(i+1) channels, one level deeper: the bottom up stage uses heads[-1]) use heads[i]
    heads: Annotated[list[PositiveInt], Field(min_length=1)] = [4, 8]
    mlp_ratio: Annotated[float, Field(gt=0)] = 4.0
    dropout: Fraction = 0.0  # attention, projection and MLP dropout
    drop_path: Fraction = 0.1  # stochastic depth, rising linearly to this over all blocks
    # U-Net skips: add down stage i's output to the up path at the same grid. The published SwinLSTM-D and
    # DATSwinLSTM-D-Memory have none (false: presets/reference_sevir.yaml); true is our addition, the default
    # because it learned more reliably on the sample (benchmarks/README.md, "Memory-model options")
    skips: bool = True
    head: Literal["sigmoid", "linear"] = "sigmoid"  # sigmoid bounds predictions to 0-1 (the reference)
    # residual output anchored on the last input frame (ours): prediction = x[:, -1] + learned change, the
    # output layer zero-initialised, so a fresh model forecasts persistence and learns motion and growth on
    # top of it. The head then shapes the change: linear (unbounded) or sigmoid (2 sigmoid - 1, in -1..1);
    # convlstm's 1x1 output conv has no activation, so its change is linear. Predictions stay unclamped
    residual: bool = False
    # motion-aware output (ours, after NowcastNet's evolution network; needs residual: true): each forecast
    # step also predicts a flow field, and the previous frame advected by it (semi-Lagrangian warp) is the
    # anchor the change is added to: x_{t+1} = warp(x_t, v_t) + s_t. The flow layer starts at zero, so a
    # fresh model is still persistence (models/motion.py; benchmarks/README.md, "Skill")
    motion: bool = False
    # where the flow of model.motion starts: none (zero: persistence) | block_matching (a flow matched between
    # the last inputs, as classical extrapolation; the network's flow is added to it)
    prior: PriorConfig = PriorConfig()
    # what model.motion advects in from outside the frame, where the true rain is unseen: zero (as pysteps'
    # extrapolation; rain near the upwind edge is lost) | edge (the nearest edge pixel: the border held as
    # persistence). edge is ours, chosen on the val split (benchmarks/README.md, "Inflow at the frame's edge")
    inflow: Literal["zero", "edge"] = "edge"
    # position information of window attention: relative (a learned bias per relative offset, Swin), absolute
    # (a learned embedding per position in the window, added to the tokens), sincos (fixed 2D sin/cos, added),
    # rotary (2D RoPE on queries and keys; head dims multiples of 4)
    pos: Literal["relative", "absolute", "sincos", "rotary"] = "relative"
    convlstm: ConvLSTMConfig = ConvLSTMConfig()
    dat: DATConfig = DATConfig()
    memory: MemoryConfig = MemoryConfig()

    @property
    def stages(self) -> int:
        return len(self.depths_down)

    @model_validator(mode="after")
    def _consistent(self) -> ModelConfig:
        if len(self.depths_up) != len(self.depths_down):
            raise ValueError("model.depths_up and model.depths_down must have the same length (one entry per stage)")
        if len(self.heads) != len(self.depths_down):
            raise ValueError("model.heads needs one entry per stage, as many as model.depths_down")
        if self.motion and not self.residual:
            raise ValueError(
                "model.motion = true needs model.residual = true (the change is added to the advected "
                "frame); set model.residual: true or model.motion: false"
            )
        if self.prior.kind != "none" and not self.motion:
            raise ValueError(
                f"model.prior.kind = {self.prior.kind} needs model.motion = true (the prior is the flow "
                "the forecast is advected by); set model.motion: true or model.prior.kind: none"
            )
        if self.name == "convlstm":
            if self.convlstm.kernel_size % 2 == 0:
                raise ValueError(f"model.convlstm.kernel_size = {self.convlstm.kernel_size} must be odd")
            return self
        # heads[i] serves embed_dim * 2^i (down stage i) and embed_dim * 2^(i+1) (up stage S-1-i), so
        # dividing the first divides the second
        for i, heads in enumerate(self.heads):
            dim = self.embed_dim * 2**i
            if dim % heads:
                raise ValueError(
                    f"model.embed_dim x 2^{i} = {dim} (stage {i} channels) is not divisible by "
                    f"model.heads[{i}] = {heads}; change model.embed_dim or model.heads"
                )
        for i, heads in enumerate(self.heads):
            head_dim = self.embed_dim * 2**i // heads
            if self.pos == "rotary" and head_dim % 4:
                raise ValueError(
                    f"model.pos = rotary needs head dims divisible by 4, but model.embed_dim x 2^{i} / "
                    f"model.heads[{i}] = {head_dim}; change model.embed_dim, model.heads or model.pos"
                )
        if self.pos == "sincos" and self.embed_dim % 4:
            raise ValueError(f"model.pos = sincos needs model.embed_dim divisible by 4, got {self.embed_dim}")
        if self.name == "datswinlstm_memory":
            if self.memory.dim % self.memory.heads:
                raise ValueError(
                    f"model.memory.dim = {self.memory.dim} is not divisible by model.memory.heads = {self.memory.heads}"
                )
            for i, heads in enumerate(self.heads):
                if heads % self.dat.groups:
                    raise ValueError(
                        f"model.heads[{i}] = {heads} is not divisible by model.dat.groups = {self.dat.groups}"
                    )
            if self.dat.offset_kernel % 2 == 0:
                raise ValueError(f"model.dat.offset_kernel = {self.dat.offset_kernel} must be odd")
        return self

    def spatial_multiple(self) -> int:
        """Frame height and width must be multiples of this.

        ConvLSTM: ``patch_size`` (space-to-depth). Swin models:
        ``patch_size * window_size * 2^stages``, because the token grid
        (H / patch_size) is halved by each of the ``stages`` patch mergings
        (one after every down stage) and every grid, the bottom one included,
        must tile into whole windows.
        """
        if self.name == "convlstm":
            return self.patch_size
        return self.patch_size * self.window_size * 2**self.stages

    def check_frame_size(self, height: int, width: int, prefix: str = "model") -> None:
        """Raise ValueError naming the keys when (height, width) cannot go through this model."""
        m = self.spatial_multiple()
        if height % m == 0 and width % m == 0:
            return
        if self.name == "convlstm":
            rule = f"{prefix}.patch_size = {m}"
        else:
            rule = f"{prefix}.patch_size x {prefix}.window_size x 2^stages (stages = len({prefix}.depths_down)) = {m}"
        raise ValueError(f"frame {height}x{width} is not divisible by {rule}; change those keys or windows.downsample")
