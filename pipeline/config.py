"""params.yaml -> one typed, validated config object.

``load(path)`` is the only place params.yaml is read. Every stage receives the
returned :class:`Config` (or one of its sections). A wrong type, an unknown key
or an impossible value raises :class:`ConfigError` with one line that names the
key and what is allowed.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from models.config import ModelConfig
from pipeline.errors import ConfigError

PositiveInt = Annotated[int, Field(ge=1)]
NonNegInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
NonNegFloat = Annotated[float, Field(ge=0)]
Fraction = Annotated[float, Field(ge=0, le=1)]


class Section(BaseModel):
    """Base of every params.yaml section: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


# --------------------------------------------------------------------------- data
class SyntheticSource(Section):
    """The embedded SEVIR-format sample generator (pipeline.sevir.synthetic)."""

    n_events: PositiveInt = 100
    size: Annotated[int, Field(ge=16, le=1024)] = 128  # frame height = width, pixels
    frames: Annotated[int, Field(ge=2, le=49)] = 49  # frames per event (SEVIR: 49 at 5 min)
    events_per_file: PositiveInt = 50
    storm_fraction: Fraction = 0.7  # share of 'S' (storm) events vs 'R' (random)
    first_day: dt.date = dt.date(2018, 1, 1)  # time_utc is spread from here ...
    last_day: dt.date = dt.date(2019, 12, 31)  # ... to here, so every split has events

    @model_validator(mode="after")
    def _days_ordered(self) -> SyntheticSource:
        if self.last_day <= self.first_day:
            raise ValueError("data.synthetic.last_day must be after data.synthetic.first_day")
        return self


class S3Source(Section):
    """The public SEVIR bucket (or an S3-compatible mirror), read with unsigned requests."""

    bucket: str = "sevir"
    endpoint_url: str | None = None  # e.g. http://127.0.0.1:9000 for a mirror
    region: str = "us-east-1"
    catalog_key: str = "CATALOG.csv"
    data_prefix: str = "data"  # file_name in the catalog is relative to this prefix
    years: list[Annotated[int, Field(ge=2017, le=2030)]] = [2019]
    event_types: list[str] = []  # catalog event_type values to keep; empty keeps all
    max_files: NonNegInt = 1  # cap on VIL files downloaded; 0 = no cap
    max_events: NonNegInt = 0  # cap on catalog VIL events kept; 0 = no cap
    retries: NonNegInt = 5
    backoff_s: NonNegFloat = 1.0
    part_size_mb: PositiveInt = 16
    concurrency: Annotated[int, Field(ge=1, le=64)] = (
        4  # connections at once: files in flight, else ranged parts of one
    )


class LocalSource(Section):
    """An existing SEVIR directory, used in place without copying.

    Two layouts: the bucket's, as ``aws s3 sync s3://sevir DIR`` leaves it (``DIR/CATALOG.csv``,
    files under ``DIR/data/vil/...``, catalog ``file_name`` relative to ``data/``), or flat
    (``DIR/CATALOG.csv`` and ``DIR/vil/...``).
    """

    path: Path | None = None
    data_prefix: str | None = None  # folder under path that file_name is relative to; None = detect ("data" or "")
    years: list[Annotated[int, Field(ge=2017, le=2030)]] = []  # empty keeps all years
    event_types: list[str] = []  # catalog event_type values to keep; empty keeps all

    @model_validator(mode="after")
    def _prefix_is_relative(self) -> LocalSource:
        if self.data_prefix is not None:
            parts = self.data_prefix.replace("\\", "/").split("/")
            if self.data_prefix.startswith(("/", "\\")) or ".." in parts or ":" in parts[0]:
                raise ValueError(
                    f"data.local.data_prefix must be a folder under data.local.path (got {self.data_prefix!r})"
                )
        return self


class SplitConfig(Section):
    """Chronological split on each event's frame span (default: the Earthformer dates); the rule is
    :func:`pipeline.sevir.windows.assign_splits`."""

    train_end: dt.datetime = dt.datetime(2019, 1, 1)  # train: last frame < train_end
    val_end: dt.datetime = dt.datetime(
        2019, 6, 1
    )  # val: first frame >= train_end, last < val_end; test: first >= val_end

    @model_validator(mode="after")
    def _ordered(self) -> SplitConfig:
        if self.val_end <= self.train_end:
            raise ValueError("data.split.val_end must be after data.split.train_end")
        return self


class DataConfig(Section):
    source: Literal["synthetic", "s3", "local"] = "synthetic"
    root: Path = Path("data/raw")  # fetch output: CATALOG.csv + vil/YYYY/SEVIR_VIL_*.h5
    seed: NonNegInt = 0
    synthetic: SyntheticSource = SyntheticSource()
    s3: S3Source = S3Source()
    local: LocalSource = LocalSource()
    split: SplitConfig = SplitConfig()
    lock_wait_s: NonNegFloat = 600.0  # a second fetch into the same root waits this long for the first, then stops

    @model_validator(mode="after")
    def _local_needs_path(self) -> DataConfig:
        if self.source == "local" and self.local.path is None:
            raise ValueError("data.local.path must name an existing SEVIR directory when data.source is 'local'")
        return self


# ------------------------------------------------------------------------ windows
class WindowsConfig(Section):
    """How each 49-frame event is cut into input+target windows (stage chunk).

    ``frame_step`` keeps every k-th frame of an event (1 = 5 min, 2 = 10 min); ``in_len``,
    ``out_len``, ``stride`` and ``memory_len`` count the kept frames.
    """

    in_len: PositiveInt = 13
    out_len: PositiveInt = 12
    stride: PositiveInt = 12
    frame_step: Annotated[int, Field(ge=1, le=48)] = 1  # 1 = 5-minute frames; 2 = 10-minute (SEVIR-LR)
    memory_len: PositiveInt | None = None  # phase-1 long clip; None = in_len + out_len
    downsample: PositiveInt = 1  # spatial factor, e.g. 3 turns 384x384 into 128x128
    root: Path = Path("data/windows")
    chunk_events: PositiveInt = 1  # events read from h5 at once (bounds memory)
    workers: Annotated[int, Field(ge=1, le=64)] | None = (
        None  # threads preparing and writing events; None = CPUs, 2 to 4
    )

    @property
    def window_len(self) -> int:
        return self.in_len + self.out_len

    @property
    def long_len(self) -> int:
        return self.memory_len if self.memory_len is not None else self.window_len

    @property
    def event_frames(self) -> int:
        """Frames of a 49-frame SEVIR event that are kept at ``frame_step`` (49, 25, 17, ...)."""
        return (49 - 1) // self.frame_step + 1

    @model_validator(mode="after")
    def _fits(self) -> WindowsConfig:
        n, step = self.event_frames, self.frame_step
        of = (
            f"the {n} frames a SEVIR event has at windows.frame_step = {step}"
            if step > 1
            else "the 49 frames of a SEVIR event"
        )
        if self.window_len > n:
            raise ValueError(f"windows.in_len + windows.out_len = {self.window_len} exceeds {of}")
        if self.memory_len is not None and not self.window_len <= self.memory_len <= n:
            raise ValueError(f"windows.memory_len must be between in_len + out_len ({self.window_len}) and {n} ({of})")
        return self


# -------------------------------------------------------------------------- train
VIL_SCALE = Annotated[int, Field(ge=0, le=255)]


class PhaseConfig(Section):
    """One training phase (``train.phase1`` / ``train.phase2``): optimiser, schedule, loss, stopping."""

    epochs: PositiveInt = 2
    max_steps_per_epoch: NonNegInt = 0  # 0 = whole epoch; otherwise batches per epoch
    # AdamW; per-group learning rates (null = lr): encoder, decoder (up path / forecaster), head
    lr: PositiveFloat = 1e-3
    lr_encoder: PositiveFloat | None = None
    lr_decoder: PositiveFloat | None = None
    lr_head: PositiveFloat | None = None
    weight_decay: NonNegFloat = 1e-4  # not applied to biases, norms and other 1-D parameters
    beta1: Annotated[float, Field(ge=0, lt=1)] = 0.9
    beta2: Annotated[float, Field(ge=0, lt=1)] = 0.999
    # lr schedule, stepped per optimiser step: cosine (warm-up then cosine to min_lr_frac x lr), onecycle
    # (cosine ramp over the warm-up from lr/25 to lr, cosine down to lr/1e4), cosine_restarts (warm-up then
    # SGDR: periods of restart_epochs x restart_mult^k epochs), constant (warm-up then flat)
    schedule: Literal["cosine", "onecycle", "cosine_restarts", "constant"] = "cosine"
    warmup_frac: Fraction = 0.1  # share of all optimiser steps spent warming up
    min_lr_frac: Fraction = 0.0
    restart_epochs: PositiveInt = 1
    restart_mult: PositiveInt = 2
    grad_clip: NonNegFloat = 1.0  # max global grad norm; 0 = off
    grad_accum: PositiveInt = 1  # batches per optimiser step
    # loss = l1_weight * L1 + l2_weight * MSE (+ ssim_weight * (1 - SSIM)) (+ recon_weight * input reconstruction)
    l1_weight: NonNegFloat = 1.0
    l2_weight: NonNegFloat = 1.0
    ssim_weight: NonNegFloat = 0.0
    recon_weight: NonNegFloat = 0.0  # forecast the second half of the inputs from the first half (one more forward)
    # + csi_weight * (1 - soft CSI): the mean over csi_thresholds (VIL 0-255) of a differentiable CSI whose
    # forecast events are sigmoid((pred - T) / csi_softness) (pipeline/training/losses.py)
    csi_weight: NonNegFloat = 0.0
    csi_thresholds: Annotated[list[VIL_SCALE], Field(min_length=1)] = [16, 74, 133, 160, 181, 219]
    csi_softness: PositiveFloat = 2.0  # VIL units: the sigmoid's width around each threshold
    # B-MAE / B-MSE (Shi et al. 2017): pixel weights by intensity class of the target; class k holds
    # VIL in [balance_thresholds[k-1], balance_thresholds[k]) on the 0-255 scale
    balanced: bool = False
    balance_thresholds: list[VIL_SCALE] = [16, 74, 133, 181]
    balance_weights: list[PositiveFloat] = [1.0, 2.0, 5.0, 10.0, 30.0]
    align: bool = True  # memory models, phase 1: a phase-2 step on the same batch after each phase-1 step
    ema_decay: Annotated[float, Field(ge=0, lt=1)] = 0.0  # 0 = off; else validate and save the EMA weights
    best_key: str = "val.csi_m"  # the validation metric that picks best.pt and drives early stopping
    best_mode: Literal["auto", "min", "max"] = "auto"  # auto: min for loss/mse/mae keys, max otherwise
    early_stop_patience: NonNegInt = 0  # epochs without improvement of best_key before stopping; 0 = off

    @model_validator(mode="after")
    def _balance(self) -> PhaseConfig:
        if self.balance_thresholds != sorted(set(self.balance_thresholds)):
            raise ValueError("balance_thresholds must be strictly increasing")
        if len(self.balance_weights) != len(self.balance_thresholds) + 1:
            raise ValueError("balance_weights needs one more entry than balance_thresholds (one per class)")
        if self.l1_weight + self.l2_weight + self.ssim_weight + self.csi_weight == 0:
            raise ValueError("l1_weight, l2_weight, ssim_weight and csi_weight are all 0: the loss would be empty")
        if not self.best_key.startswith(("val.", "train.")):
            raise ValueError(f"best_key {self.best_key!r} must name a logged metric, e.g. val.loss or val.csi_m")
        return self

    def mode(self) -> Literal["min", "max"]:
        """Whether a lower or a higher ``best_key`` is better."""
        if self.best_mode != "auto":
            return self.best_mode
        lower = ("loss", "mse", "mae", "far")
        return "min" if any(word in self.best_key.rsplit(".", 1)[-1] for word in lower) else "max"


class OversampleConfig(Section):
    """Heavy-rain oversampling of the TRAIN split only (val and test are never resampled)."""

    enabled: bool = False
    threshold: VIL_SCALE = 133  # a target pixel at or above this is heavy rain
    min_fraction: Fraction = 0.01  # a window is heavy when this share of its target pixels is heavy
    factor: Annotated[float, Field(ge=1)] = 4.0  # heavy windows are drawn this many times as often


class AugmentConfig(Section):
    """Training-only augmentation, applied on the device to the 0-1 batch."""

    noise_std: NonNegFloat = 0.0  # Gaussian noise on the inputs (0-1 scale), clamped to [0, 1]
    mask_prob: Fraction = 0.0  # chance of zeroing each mask_size x mask_size input patch (all frames)
    mask_size: PositiveInt = 16
    time_shift: NonNegInt = 0  # move a batch's window up to this many frames earlier (needs windows.memory_len room)


class TrainConfig(Section):
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto = cuda when available
    precision: Literal["auto", "fp32", "bf16", "fp16"] = (
        "auto"  # auto = bf16 on CUDA (fp16 if unsupported), fp32 on CPU
    )
    compile: bool = False  # torch.compile the model
    batch_size: PositiveInt | Literal["auto"] = 4  # per process; auto (CUDA): the largest that fits, found by trying
    max_batch_size: PositiveInt = 256  # upper bound of the auto search
    num_workers: NonNegInt = 0  # DataLoader worker processes
    threads: NonNegInt = 0  # torch intra-op threads per process; 0 = cores / processes - 1 (at least 1)
    nproc_per_node: PositiveInt = 1  # > 1: the stage launches this many DDP workers (torch.distributed.run)
    seed: NonNegInt = 0
    checkpoint_dir: Path = Path("artifacts")  # phase{1,2}/{last,best}.pt
    val_max_batches: NonNegInt = (
        0  # cap: this many batches' worth of val windows, evenly spaced over the split; 0 = all
    )
    val_max_windows: NonNegInt = (
        0  # cap in windows (the search sets it: the same subset whatever the batch size); 0 = val_max_batches
    )
    log_every: PositiveInt = 10  # steps between progress-bar refreshes (and non-finite checks)
    oversample: OversampleConfig = OversampleConfig()
    augment: AugmentConfig = AugmentConfig()
    phase1: PhaseConfig = PhaseConfig()
    phase2: PhaseConfig = PhaseConfig()

    def phase(self, n: int) -> PhaseConfig:
        if n not in (1, 2):
            raise ValueError(f"phase must be 1 or 2, got {n!r}")
        return self.phase1 if n == 1 else self.phase2


# ----------------------------------------------------------------------- evaluate
class EvaluateConfig(Section):
    """Stage evaluate and the scores of training validation (pipeline.scoring)."""

    thresholds: list[Annotated[int, Field(ge=0, le=255)]] = [16, 74, 133, 160, 181, 219]  # VIL 0-255, event: >= T
    pool_sizes: list[Annotated[int, Field(ge=2)]] = [4, 16]  # pooled CSI, max-pool kernel = stride (pixels)
    fss_scales: list[PositiveInt] = []  # FSS neighbourhoods in pixels, e.g. [1, 4, 16]; empty = no FSS
    ssim: bool = True
    baselines: list[Literal["persistence", "optical_flow"]] = ["persistence", "optical_flow"]
    split: Literal["val", "test"] = "test"  # the windows file scored (overridden by --split)
    batch_size: PositiveInt = 4
    max_batches: NonNegInt = 0  # 0 = the whole split; N = a quick look at N batches
    n_examples: NonNegInt = 3  # heavy-rain windows drawn in the forecast gallery
    # lead indices (1 = first forecast frame) in the gallery, each 1..windows.out_len; null = 1, out_len/4,
    # out_len/2, out_len (1, 3, 6, 12 at out_len 12)
    example_leads: list[PositiveInt] | None = None
    reports_dir: Path = Path("reports")

    @model_validator(mode="after")
    def _thresholds_unique(self) -> EvaluateConfig:
        if not self.thresholds:
            raise ValueError("evaluate.thresholds needs at least one threshold")
        if len(set(self.thresholds)) != len(self.thresholds) or self.thresholds != sorted(self.thresholds):
            raise ValueError(f"evaluate.thresholds must be increasing and unique, got {self.thresholds}")
        for key in ("pool_sizes", "fss_scales", "baselines", "example_leads"):
            values = getattr(self, key) or []
            if len(set(values)) != len(values):
                raise ValueError(f"evaluate.{key} lists a value twice ({values}); keep each once")
        return self

    def gallery_leads(self, out_len: int) -> list[int]:
        """The gallery's lead indices for forecasts of ``out_len`` frames (``example_leads`` or the default)."""
        if self.example_leads is not None:
            return list(self.example_leads)
        return sorted({1, max(1, out_len // 4), max(1, out_len // 2), out_len})


# ------------------------------------------------------------------------- search
class SearchParam(Section):
    """One dimension of the tuning study: a params.yaml key and the values it may take."""

    key: str  # dotted params.yaml key, e.g. train.phase1.lr or model.depths_down
    type: Literal["float", "logfloat", "int", "categorical"]
    low: float | None = None  # float/logfloat/int: inclusive range
    high: float | None = None
    step: float | None = None  # optional grid step (float, int)
    choices: list[Any] | None = None  # categorical: values (lists allowed, e.g. depths [2, 4])

    @model_validator(mode="after")
    def _complete(self) -> SearchParam:
        if self.type == "categorical":
            if not self.choices:
                raise ValueError(f"{self.key}: categorical needs a non-empty 'choices' list")
            if self.low is not None or self.high is not None:
                raise ValueError(f"{self.key}: categorical takes 'choices', not 'low'/'high'")
            return self
        if self.low is None or self.high is None or self.choices is not None:
            raise ValueError(f"{self.key}: {self.type} needs 'low' and 'high' (and no 'choices')")
        if not self.low < self.high:
            raise ValueError(f"{self.key}: empty range: low ({self.low}) must be below high ({self.high})")
        if self.type == "logfloat" and self.low <= 0:
            raise ValueError(f"{self.key}: logfloat needs low > 0 (got {self.low})")
        if self.type == "int" and (self.low != int(self.low) or self.high != int(self.high)):
            raise ValueError(f"{self.key}: int needs whole-number 'low' and 'high'")
        if self.step is not None and (self.step <= 0 or self.type == "logfloat"):
            raise ValueError(f"{self.key}: 'step' must be > 0 and is not allowed with logfloat")
        return self


class SearchConfig(Section):
    """The Optuna phase-1 study (stage search); see pipeline/tuning/."""

    study_name: str = "phase1"  # stored as <study_name>-<hash of the fixed params>
    storage: str | None = None  # None = journal file under artifacts/search/; or postgresql://user:pw@host/db
    n_trials: PositiveInt = 4  # finished trials (complete, pruned or failed) the study runs to
    timeout_s: NonNegInt = 0  # per worker; 0 = no limit
    sampler_seed: NonNegInt = 0  # TPE seed (extra workers derive theirs from it)
    epochs: PositiveInt = 1  # phase-1 epochs per trial
    max_steps_per_epoch: NonNegInt = 8  # cap per trial epoch (0 = whole epoch)
    val_max_batches: NonNegInt = 8  # validation batches per trial epoch (0 = the whole val split)
    metric: str = "val.csi_m"  # the per-epoch validation key the study maximises
    direction: Literal["maximize", "minimize"] = "maximize"
    pruner: Literal["median", "hyperband", "none"] = "median"
    pruner_warmup_epochs: NonNegInt = 0  # epochs before the median pruner may stop a trial
    gc_after_trial: bool = True
    heartbeat_s: PositiveInt = 10  # a running trial's heartbeat period
    grace_s: PositiveInt = 60  # a trial silent this long (worker died) is failed and retried
    max_retries: NonNegInt = 1  # retries of a trial whose worker died
    space: list[SearchParam] = []

    @model_validator(mode="after")
    def _keys_exist(self) -> SearchConfig:
        seen: set[str] = set()
        for i, param in enumerate(self.space):
            where = f"search.space[{i}] ({param.key})"
            if param.key in seen:
                raise ValueError(f"{where}: key listed twice; keep one entry per key")
            seen.add(param.key)
            if param.key.split(".")[0] in ("search", "tracking", "data", "windows"):
                raise ValueError(f"{where}: not tunable; the space takes model.* and train.* keys")
            check_space_entry(param, where)
        return self


def _field_at(key: str) -> Any:
    """The pydantic field of a dotted params key (``model.memory.slots``), or None."""
    model: Any = Config
    field = None
    for part in key.split("."):
        fields = getattr(model, "model_fields", None)
        if not fields or part not in fields:
            return None
        field = fields[part]
        model = field.annotation
    return field


def check_space_entry(param: SearchParam, where: str) -> None:
    """A space entry names an existing key, and its range/choices have the key's type and bounds."""
    from pydantic import TypeAdapter

    field = _field_at(param.key)
    if field is None:
        raise ValueError(f"{where}: not a params.yaml key; use a dotted key such as train.phase1.lr or model.embed_dim")
    if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
        raise ValueError(f"{where}: names a whole section; name one of its keys")
    adapter = TypeAdapter(Annotated[field.annotation, *field.metadata] if field.metadata else field.annotation)
    if param.type == "categorical":
        values = list(param.choices or [])
    elif param.type == "int":
        values = [int(param.low), int(param.high)]  # type: ignore[arg-type]
    else:
        values = [param.low, param.high]
    for value in values:
        try:
            adapter.validate_python(value, strict=param.type == "int" and field.annotation is float)
        except ValidationError as err:
            msg = err.errors(include_url=False)[0]["msg"]
            raise ValueError(f"{where}: {value!r} is not a valid value for {param.key} ({msg})") from None


# ----------------------------------------------------------------------- tracking
class TrackingConfig(Section):
    enabled: bool = True  # false: stages log nothing to MLflow
    uri: str | None = None  # None = sqlite:///<repo>/mlflow.db (or $MLFLOW_TRACKING_URI)
    experiment: str = "sevir-nowcasting"
    log_system_metrics: bool = False


# ------------------------------------------------------------------------ the lot
class Config(Section):
    data: DataConfig = DataConfig()
    windows: WindowsConfig = WindowsConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    search: SearchConfig = SearchConfig()
    tracking: TrackingConfig = TrackingConfig()

    @model_validator(mode="after")
    def _frame_fits_model(self) -> Config:
        # The model's spatial constraint depends on the frame size the windows will have.
        size = self.frame_size()
        if size is not None:
            self.model.check_frame_size(size, size, prefix="model")
        return self

    @model_validator(mode="after")
    def _train_fits(self) -> Config:
        p1 = self.train.phase1
        if self.model.name == "datswinlstm_memory" and p1.align and p1.grad_accum > 1:
            raise ValueError(
                "train.phase1.grad_accum > 1 cannot accumulate two kinds of step; set train.phase1.align: false "
                "or train.phase1.grad_accum: 1"
            )
        shift = self.train.augment.time_shift
        if shift and self.windows.long_len - self.windows.window_len < shift:
            raise ValueError(
                f"train.augment.time_shift = {shift} needs windows.memory_len >= in_len + out_len + {shift} "
                f"(= {self.windows.window_len + shift}) so the earlier frames are stored"
            )
        return self

    @model_validator(mode="after")
    def _names_exist(self) -> Config:
        # keys that name a metric or a lead are checked here, before any data is read or any step taken
        for phase in (1, 2):
            key = self.train.phase(phase).best_key
            allowed = epoch_metric_keys(self, phase)
            if key not in allowed:
                raise ValueError(f"train.phase{phase}.best_key = {key!r} is not a metric that phase {phase} logs; "
                                 f"allowed: {', '.join(allowed)}")  # fmt: skip
        allowed = search_metric_keys(self)
        if self.search.metric not in allowed:
            raise ValueError(f"search.metric = {self.search.metric!r} is not a metric that a trial's validation "
                             f"reports; allowed: {', '.join(allowed)}")  # fmt: skip
        if self.data.source == "synthetic":  # the sample's events are data.synthetic.frames long, not 49
            win, frames = self.windows, self.data.synthetic.frames
            kept = (frames - 1) // win.frame_step + 1
            if win.long_len > kept:
                raise ValueError(f"windows: a window (and its long clip) needs {win.long_len} frames but the synthetic "
                                 f"events have {kept} (data.synthetic.frames = {frames} at windows.frame_step = "
                                 f"{win.frame_step}); shorten windows.in_len/out_len/memory_len or raise "
                                 "data.synthetic.frames")  # fmt: skip
        out_len = self.windows.out_len
        bad = [lead for lead in self.evaluate.example_leads or [] if not 1 <= lead <= out_len]
        if bad:
            raise ValueError(f"evaluate.example_leads = {self.evaluate.example_leads}: lead {bad[0]} is outside the "
                             f"forecast; allowed: 1 .. windows.out_len ({out_len})")  # fmt: skip
        return self

    def frame_size(self) -> int | None:
        """Frame side after downsampling, when it is known from params (synthetic: size; SEVIR: 384)."""
        raw = self.data.synthetic.size if self.data.source == "synthetic" else 384
        if raw % self.windows.downsample:
            raise ValueError(
                f"windows.downsample = {self.windows.downsample} does not divide the frame size {raw}; pick a divisor"
            )
        return raw // self.windows.downsample


def val_metric_keys(cfg: Config) -> list[str]:
    """What training validation logs each epoch (``pipeline.training.loop`` ``_validate``): losses, then
    the scores of :class:`pipeline.scoring.ScoreAccumulator` at ``evaluate.thresholds`` / ``pool_sizes``."""
    ev = cfg.evaluate
    keys = ["val.loss", "val.mse", "val.mae", "val.csi_m", "val.hss_m"]
    keys += [f"val.csi_pool{k}_m" for k in ev.pool_sizes]
    keys += ["val.ssim"] if ev.ssim else []
    keys += [f"val.csi.{t}" for t in ev.thresholds]
    return keys


def epoch_metric_keys(cfg: Config, phase: int) -> list[str]:
    """The keys a ``best_key`` may name: validation's, then the epoch's training losses (``_train_epoch``)."""
    train = ["train.loss", "train.l1", "train.mse"]
    if phase == 1 and cfg.model.name == "datswinlstm_memory":  # two kinds of step: phase-1 (+ alignment)
        train += ["train.loss_phase1"] + (["train.loss_align"] if cfg.train.phase1.align else [])
    return val_metric_keys(cfg) + train


def search_metric_keys(cfg: Config) -> list[str]:
    """The keys ``search.metric`` may name: what every trial reports, whatever the space draws."""
    return val_metric_keys(cfg) + ["train.loss", "train.l1", "train.mse"]


def _format_loc(loc: tuple[Any, ...]) -> str:
    return ".".join(str(part) for part in loc)


def format_validation_error(err: ValidationError, source: str) -> str:
    """One line per problem: ``<file>: <key>: <what is wrong and what is allowed>``; first problem only."""
    first = err.errors(include_url=False)[0]
    key = _format_loc(first["loc"])
    kind = first["type"]
    if kind == "extra_forbidden":
        parent = first["loc"][:-1]
        allowed = _allowed_keys(parent)
        hint = f"unknown key; allowed keys here: {', '.join(allowed)}" if allowed else "unknown key"
        return f"{source}: {key}: {hint}"
    msg = first["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    if kind in {"value_error", "assertion_error"} and (not key or msg.startswith(key.split(".")[0])):
        return f"{source}: {msg}"
    got = first.get("input")
    got_txt = "" if isinstance(got, dict) else f" (got {got!r})"
    return f"{source}: {key}: {msg}{got_txt}"


def _allowed_keys(loc: tuple[Any, ...]) -> list[str]:
    model: type[BaseModel] = Config
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None or not isinstance(field.annotation, type) or not issubclass(field.annotation, BaseModel):
            return []
        model = field.annotation
    return list(model.model_fields)


def from_dict(raw: dict[str, Any] | None, source: str = "params.yaml") -> Config:
    """Validate a params mapping (as read from YAML) into a :class:`Config`."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections (data, windows, model, ...)")
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None
    except ValueError as err:  # raised outside pydantic's wrapping (e.g. in a property)
        raise ConfigError(f"{source}: {err}") from None


def load(path: str | Path = "params.yaml") -> Config:
    """Read and validate params.yaml. Raises :class:`ConfigError` naming the key at fault."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found; run from the repository root or pass --params")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}:{where} is not valid YAML ({getattr(err, 'problem', err)})") from None
    return from_dict(raw, source=str(path))
