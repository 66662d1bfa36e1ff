"""The typed ``model`` section of params.yaml (validated by pydantic).

Lives with the networks (like nanoGPT's GPTConfig) so that adding a knob to a
model touches one package. ``pipeline.config`` composes it into the full config.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

PositiveInt = Annotated[int, Field(ge=1)]
Fraction = Annotated[float, Field(ge=0, lt=1)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class ConvLSTMConfig(_Section):
    hidden: list[PositiveInt] = [32, 32]  # channels of each stacked cell
    kernel_size: PositiveInt = 3


class MemoryConfig(_Section):
    slots: PositiveInt = 100  # rows of the learnable memory bank
    dim: PositiveInt = 128  # channels of each slot


class ModelConfig(_Section):
    name: Literal["convlstm", "swinlstm", "datswinlstm_memory"] = "datswinlstm_memory"
    in_channels: PositiveInt = 1
    embed_dim: PositiveInt = 32
    patch_size: PositiveInt = 4
    window_size: PositiveInt = 4
    depths_down: list[PositiveInt] = [2, 2]
    depths_up: list[PositiveInt] = [2, 2]
    heads: list[PositiveInt] = [4, 8]
    mlp_ratio: Annotated[float, Field(gt=0)] = 4.0
    dropout: Fraction = 0.0
    drop_path: Fraction = 0.1
    convlstm: ConvLSTMConfig = ConvLSTMConfig()
    memory: MemoryConfig = MemoryConfig()

    @model_validator(mode="after")
    def _consistent(self) -> ModelConfig:
        if len(self.depths_up) != len(self.depths_down):
            raise ValueError("model.depths_up and model.depths_down must have the same length (one entry per stage)")
        if len(self.heads) != len(self.depths_down):
            raise ValueError("model.heads needs one entry per stage, as many as model.depths_down")
        return self

    def spatial_multiple(self) -> int:
        """Frame height and width must be multiples of this."""
        if self.name == "convlstm":
            return self.patch_size
        return self.patch_size * self.window_size * 2 ** (len(self.depths_down) - 1)

    def check_frame_size(self, height: int, width: int, prefix: str = "model") -> None:
        """Raise ValueError naming the keys when (height, width) cannot go through this model."""
        m = self.spatial_multiple()
        if height % m or width % m:
            raise ValueError(
                f"frame {height}x{width} is not divisible by {prefix}.patch_size x {prefix}.window_size x "
                f"2^(stages-1) = {m}; change those keys or windows.downsample"
            )
