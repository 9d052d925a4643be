"""The sections of a run config (rectiflow.train.config): one frozen dataclass per TOML table, each field
with its default and its check. rectiflow.train.config assembles them into RunConfig and reads / writes TOML.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rectiflow.errors import ConfigError
from rectiflow.flow import check_cfg_interval, check_contrastive, parse_time_shift
from rectiflow.train.lr_schedule import SCHEDULES

__all__ = [
    "ModelConfig", "DataConfig", "FlowConfig", "OptimConfig", "EMAConfig", "TrainLoopConfig",
    "ValidationConfig", "LoggingConfig", "CheckpointConfig", "ExportConfig", "DistributedConfig",
    "DistillConfig", "GuidanceDistillConfig", "LoraConfig",
]

PRECISIONS = ("fp32", "bf16")
EXPORT_FORMATS = ("rectiflow", "bfl", "diffusers")
DIST_MODES = ("none", "ddp", "fsdp2")
LORA_EXPORT_FORMATS = ("kohya", "diffusers")


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


@dataclass(frozen=True)
class ModelConfig:
    """preset: a transformer preset (rectiflow.models.transformer.TRANSFORMER_PRESETS); params: FluxParams
    fields overriding the preset; init: weights to start from (any format load_transformer reads; empty =
    random init seeded by train.seed); autoencoder: an autoencoder file/folder used to decode validation
    samples and for the exported bundle (empty = no sample grid, no bundle); guidance: the guidance value fed
    to a guidance-distilled model (guidance_embed=True, e.g. FLUX-dev) while fine-tuning it (3.5: FLUX-dev's
    recommended value, also the default of diffusers' train_dreambooth_flux.py --guidance_scale)."""

    preset: str = "tiny"
    params: dict[str, Any] = field(default_factory=dict)
    init: str = ""
    autoencoder: str = ""
    guidance: float = 3.5


@dataclass(frozen=True)
class DataConfig:
    """cache: a latent cache directory (`rectiflow cache`). batch_size is the GLOBAL batch (all ranks and
    accumulation micro-batches together); it must be divisible by world_size * optim.accumulation.
    caption_mix: field -> probability (None: all fields equally; SD3 uses 50/50 original/synthetic);
    caption_dropout: probability that a sample's caption is replaced by the cached "" embedding (CFG; 0.1 is
    the usual single-encoder value, Ho & Salimans 2022). couplings: a directory of `rectiflow reflow pairs`
    (reflow, Liu et al. 2022): train on its fixed (noise, endpoint) pairs, x_t = (1 - t) z_0 + t z_1 with the
    PAIRED noise, instead of on `cache` with fresh noise (caption dropout applies to it too); `cache` is then
    unused unless mix_cache is true: its samples (fresh noise) join the pairs, the real-data loss mixed in
    by their numbers. negative_cache: a cache of counterfactual images, row for row the same samples and
    captions as `cache` (`rectiflow data shapes --counterfactual`, then `rectiflow cache` with the same
    arguments), each row an image its captions are false of; the negatives of flow.contrastive =
    "counterfactual"."""

    cache: str = ""
    couplings: str = ""
    mix_cache: bool = False
    negative_cache: str = ""
    batch_size: int = 8
    caption_mix: dict[str, float] | None = None
    caption_dropout: float = 0.1

    def __post_init__(self):
        _check(self.batch_size >= 1, f"data.batch_size={self.batch_size}; use a positive integer")
        _check(0.0 <= self.caption_dropout <= 1.0,
               f"data.caption_dropout={self.caption_dropout}; use a probability in [0, 1]")


@dataclass(frozen=True)
class FlowConfig:
    """path: a rectiflow.flow path name; timesteps: a training timestep sampler with its params (default
    logit-normal(0, 1): SD3's best rectified-flow setting, Esser et al. 2024 sec. 5.1, "rf/lognorm(0.00,
    1.00)"); loss_weight: an extra per-sample weight (rectiflow.flow.loss_weight; "none" with a non-uniform
    sampler is SD3's formulation); loss: the per-sample metric (rectiflow.flow.losses: "mse", or
    "pseudo_huber" with c, Lee et al. 2024's choice for reflow). contrastive / contrastive_weight: contrastive
    flow matching (rectiflow.flow.contrastive): the loss minus contrastive_weight times the same metric
    against a negative's target, the negative another sample of the batch ("batch", Stoica et al. 2025's
    Delta-FM, weight 0.05 there) or the row's counterfactual image under the same noise ("counterfactual",
    data.negative_cache); "none" is plain flow matching."""

    path: str = "rectified_flow"
    timesteps: str = "logit_normal"
    timestep_params: dict[str, float] = field(default_factory=lambda: {"m": 0.0, "s": 1.0})
    loss_weight: str = "none"
    loss_weight_params: dict[str, float] = field(default_factory=dict)
    loss: str = "mse"
    loss_params: dict[str, float] = field(default_factory=dict)
    contrastive: str = "none"
    contrastive_weight: float = 0.0

    def __post_init__(self):
        check_contrastive(self.contrastive, self.contrastive_weight)


@dataclass(frozen=True)
class OptimConfig:
    """AdamW (SD3, Esser et al. 2024 sec. 5.3, and DiT, Peebles & Xie 2023: AdamW at lr 1e-4 with no weight
    decay; SD3 warms up linearly over 1000 steps). schedule after warmup: constant | cosine | linear down to
    min_lr_ratio * lr at train.steps. grad_clip: max global grad norm (0 = off)."""

    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 1000
    schedule: str = "constant"
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0
    accumulation: int = 1

    def __post_init__(self):
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        _check(self.lr > 0, f"optim.lr={self.lr}; use a positive learning rate")
        _check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
               f"optim.betas={list(self.betas)}; use two numbers in [0, 1)")
        _check(self.warmup_steps >= 0, f"optim.warmup_steps={self.warmup_steps}; use >= 0")
        _check(self.schedule in SCHEDULES, f"optim.schedule={self.schedule!r}; choose one of {SCHEDULES}")
        _check(0 <= self.min_lr_ratio <= 1, f"optim.min_lr_ratio={self.min_lr_ratio}; use a value in [0, 1]")
        _check(self.grad_clip >= 0, f"optim.grad_clip={self.grad_clip}; use >= 0 (0 disables clipping)")
        _check(self.accumulation >= 1, f"optim.accumulation={self.accumulation}; use a positive integer")
        _check(self.weight_decay >= 0, f"optim.weight_decay={self.weight_decay}; use >= 0")


@dataclass(frozen=True)
class EMAConfig:
    """Exponential moving average of the weights, updated after every applied step from step `start` on
    (before that it copies the weights). decay 0.9999 as in DiT (Peebles & Xie 2023); short runs want less."""

    enabled: bool = True
    decay: float = 0.9999
    start: int = 0

    def __post_init__(self):
        _check(0 <= self.decay < 1, f"ema.decay={self.decay}; use a value in [0, 1)")
        _check(self.start >= 0, f"ema.start={self.start}; use >= 0")


@dataclass(frozen=True)
class TrainLoopConfig:
    """out_dir holds checkpoints/, logs/, samples/ and export/. precision: fp32 | bf16 (autocast; meant for
    GPUs). activation_checkpointing / compile: applied per transformer block as functions. The run stops with
    an error after max_bad_consecutive non-finite steps in a row or max_bad_total in all (0 = never)."""

    steps: int = 1000
    seed: int = 0
    out_dir: str = "runs/train"
    device: str = "cpu"
    precision: str = "fp32"
    activation_checkpointing: bool = False
    compile: bool = False
    log_every: int = 10
    max_bad_consecutive: int = 5
    max_bad_total: int = 50
    progress: bool = True

    def __post_init__(self):
        _check(self.steps >= 0, f"train.steps={self.steps}; use >= 0")
        _check(self.precision in PRECISIONS,
               f"train.precision={self.precision!r}; choose one of {PRECISIONS}")
        _check(self.log_every >= 1, f"train.log_every={self.log_every}; use a positive integer")
        _check(self.max_bad_consecutive >= 0 and self.max_bad_total >= 0,
               "train.max_bad_consecutive / max_bad_total must be >= 0 (0 = never stop)")


@dataclass(frozen=True)
class ValidationConfig:
    """Every `every` steps (0 = never): the loss on a fixed held-out set of `holdout` cache samples (excluded
    from training) with fixed noise at fixed times t = (k + 0.5) / buckets, k < buckets, per bucket and mean
    (the SD3 protocol, Esser et al. 2024 sec. 5.1 / app. B.2: validation loss on held-out data at fixed t),
    and a grid of `prompts` x `seeds` sampled with `sample_steps` steps of `sampler` (with `prompts` empty:
    `data_prompts` distinct captions of the dataset itself, the held-out samples' first; needs
    model.autoencoder to decode; cfg_scale > 1 uses the cached "" embedding as the unconditional input)."""

    every: int = 0
    holdout: int = 0
    buckets: int = 8
    seed: int = 1234
    use_ema: bool = False
    prompts: list[str] = field(default_factory=list)
    data_prompts: int = 0
    seeds: list[int] = field(default_factory=lambda: [0])
    sample_steps: int = 20
    sample_size: int = 0
    sampler: str = "euler"
    shift: str | float | None = None  # parsed into rectiflow.flow's TimeShift: None, "flux" or an SD3 alpha
    cfg_scale: float = 1.0

    def __post_init__(self):
        _check(self.every >= 0 and self.holdout >= 0, "validation.every and validation.holdout must be >= 0")
        _check(self.buckets >= 1, f"validation.buckets={self.buckets}; use a positive integer")
        _check(self.sample_steps >= 1, f"validation.sample_steps={self.sample_steps}; use >= 1")
        _check(self.data_prompts >= 0, f"validation.data_prompts={self.data_prompts}; use >= 0")
        _check(self.sample_size % 16 == 0, f"validation.sample_size={self.sample_size}; use a multiple of 16 "
               "(0 = the cache's image size)")
        object.__setattr__(self, "shift", parse_time_shift(self.shift, "validation.shift"))


@dataclass(frozen=True)
class LoggingConfig:
    """JSONL metrics always (out_dir/logs/metrics.jsonl); TensorBoard event files too when installed."""

    tensorboard: bool = True


@dataclass(frozen=True)
class CheckpointConfig:
    """Every `every` steps (0 = only at the end / on interrupt), keeping the newest `keep` (0 = all)."""

    every: int = 500
    keep: int = 3

    def __post_init__(self):
        _check(self.every >= 0 and self.keep >= 0, "checkpoint.every and checkpoint.keep must be >= 0")


@dataclass(frozen=True)
class ExportConfig:
    """At the end of training, the final weights (EMA when enabled and `ema` is true) in each of `formats`
    under out_dir/export/, plus a rectiflow bundle when `bundle` and model.autoencoder are set, named `name`
    (empty: the name of out_dir) in its model.json and so in the PNG metadata of what it generates."""

    formats: list[str] = field(default_factory=lambda: ["rectiflow"])
    ema: bool = True
    bundle: bool = True
    name: str = ""

    def __post_init__(self):
        bad = [f for f in self.formats if f not in EXPORT_FORMATS]
        _check(not bad, f"export.formats has {bad}; choose from {EXPORT_FORMATS}")


@dataclass(frozen=True)
class DistributedConfig:
    """mode: none | ddp | fsdp2 (rectiflow.train.distributed; launch with torchrun)."""

    mode: str = "none"

    def __post_init__(self):
        _check(self.mode in DIST_MODES, f"distributed.mode={self.mode!r}; choose one of {DIST_MODES}")


@dataclass(frozen=True)
class DistillConfig:
    """Few-step distillation (progressive distillation, Salimans & Ho 2022, on the rectified-flow ODE). With
    `teacher` set (transformer weights in any format load_transformer reads; usually model.init too), each
    step trains the model to cover with ONE Euler step of size dt = 1 / student_steps what the teacher covers
    in TWO Euler steps of dt / 2: t is drawn uniformly from the student grid 1, 1 - dt, ..., dt (the linear
    grid the sampler uses with no shift), x_t from the forward path, and the target velocity is
    (x_t - x_{t-dt}) / dt, the mean of the teacher's two velocities. Each teacher velocity uses
    classifier-free guidance at teacher_cfg (with the cache's empty caption as the unconditional input);
    above 1 the guidance is distilled too, and the student samples with CFG 1 (one forward per step).
    shift: SD3's time shift alpha of the student's grid (t' = alpha t / (1 + (alpha - 1) t) applied to the
    linear grid, as `rectiflow generate --shift alpha` samples); the teacher's two steps are then those of
    the shifted 2 * student_steps grid, and the target is (x_t - x_t') / (t - t') for the grid's next t'.
    1.0 = the linear grid.
    teacher_substeps: how many teacher Euler steps one student step covers (2 = progressive distillation's
    halving; k > 2 distils the teacher's k * student_steps-step sampler, which scores higher than its
    2 * student_steps one when it is not yet converged in steps, at k / 2 times the teacher forwards).
    teacher_cfg_interval: [lo, hi] guides the teacher only at flow times lo <= t <= hi (CFG 1 elsewhere), as
    `rectiflow generate --cfg-interval` samples it; unset, at every t."""

    teacher: str = ""
    student_steps: int = 4
    teacher_cfg: float = 1.0
    shift: float | str | None = 1.0  # parsed into rectiflow.flow's TimeShift; a constant one only
    teacher_substeps: int = 2
    teacher_cfg_interval: list[float] | None = None

    def __post_init__(self):
        _check(self.student_steps >= 1, f"distill.student_steps={self.student_steps}; use >= 1")
        _check(type(self.teacher_substeps) is int and self.teacher_substeps >= 1,
               f"distill.teacher_substeps={self.teacher_substeps!r}; use an integer >= 1 (2 = halving)")
        _check(self.teacher_cfg >= 0, f"distill.teacher_cfg={self.teacher_cfg}; use >= 0")
        interval = check_cfg_interval(self.teacher_cfg_interval, "distill.teacher_cfg_interval")
        object.__setattr__(self, "teacher_cfg_interval", None if interval is None else list(interval))
        shift = parse_time_shift(self.shift, "distill.shift")
        _check(shift != "flux", "distill.shift='flux': the student's grid takes a constant SD3 shift "
               "(a number; 1 = none)")
        object.__setattr__(self, "shift", 1.0 if shift is None else shift)

    @property
    def alpha(self) -> float:
        """The student grid's SD3 shift alpha (1 = the linear grid)."""
        return float(self.shift)


@dataclass(frozen=True)
class LoraConfig:
    """LoRA fine-tuning (rectiflow.nn.lora): with rank > 0 the model (model.init) is frozen and only adapters
    of this rank on the `targets` (groups attn / mlp / mod / all, or module-name globs) train; the optimizer
    holds state for them alone, checkpoints hold them plus the base weights' hash, and the export writes the
    adapter in `formats` (kohya: what ComfyUI / Forge load; diffusers: FluxPipeline.load_lora_weights).
    alpha 0 = rank (multiplier 1). trigger: the trigger word the captions were cached with (`rectiflow cache
    --trigger`), recorded in the exported files' metadata. preserve: a glob of sample ids (the cache's ids,
    e.g. "prior-*") whose target is the frozen base model's own prediction at the same (x_t, t, caption)
    instead of the data's velocity: prior preservation (DreamBooth's, Ruiz et al. 2023) that keeps what the
    base does on those prompts, including a distilled base's few-step behaviour (the data loss undoes it).
    guide: the CFG scale g of the other samples' target, v_u + g (v - v_u) with v their data velocity and v_u
    the model's own unconditional prediction (no gradient): a guided target, for a LoRA on a guidance-
    distilled base that samples without CFG (1 = the plain flow-matching target)."""

    rank: int = 0
    alpha: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["attn"])
    dropout: float = 0.0
    trigger: str = ""
    formats: list[str] = field(default_factory=lambda: ["kohya", "diffusers"])
    preserve: str = ""
    guide: float = 1.0

    def __post_init__(self):
        _check(self.rank >= 0, f"lora.rank={self.rank}; use a positive rank (0 = no LoRA, full fine-tune)")
        _check(self.alpha >= 0, f"lora.alpha={self.alpha}; use >= 0 (0 = the rank)")
        _check(0 <= self.dropout < 1, f"lora.dropout={self.dropout}; use a probability in [0, 1)")
        _check(not self.rank or bool(self.targets),
               "lora.targets is empty: nothing would train; name groups (attn, mlp, mod, all) or module "
               "patterns")
        bad = [f for f in self.formats if f not in LORA_EXPORT_FORMATS]
        _check(not bad, f"lora.formats has {bad}; choose from {LORA_EXPORT_FORMATS}")
        _check(self.guide >= 1.0, f"lora.guide={self.guide}; use a CFG scale >= 1 (1 = plain target)")
        _check(self.guide == 1.0 or self.rank > 0, f"lora.guide={self.guide} needs lora.rank > 0")
        _check(not self.preserve or self.rank > 0,
               f"lora.preserve={self.preserve!r} needs lora.rank > 0: the base model's prediction is the "
               "model with its adapters switched off")


@dataclass(frozen=True)
class GuidanceDistillConfig:
    """Guidance distillation (rectiflow.train.guidance_distill; Meng et al. 2023, FLUX.1 [dev]'s guidance
    embedding). With `teacher` set (a model without guidance embedding, usually model.init too) the model gets
    a guidance embedding (guidance_embed on) and learns the teacher's CFG velocity v_u + g (v_c - v_u) for g
    drawn uniformly from [scale_min, scale_max] per sample; model.guidance is then the exported bundle's
    default --guidance. The default range 1..5 covers the shapes models' useful CFG scales (2..5,
    docs/training.md); Meng et al. use w in [0, 4] (their w + 1 in our convention: 1..5)."""

    teacher: str = ""
    scale_min: float = 1.0
    scale_max: float = 5.0

    def __post_init__(self):
        _check(0 <= self.scale_min <= self.scale_max, f"guidance_distill scale range [{self.scale_min}, "
               f"{self.scale_max}]; use 0 <= scale_min <= scale_max")
