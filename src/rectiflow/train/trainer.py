"""The training loop: `Trainer(cfg).fit()` trains a FLUX transformer on a latent cache.

One step (docs/design.md section 1 conventions, all flow math from rectiflow.flow):
    global batch of cache indices -> t ~ timestep sampler [B] and eps ~ N(0, I) [B, C, h, w] from the
    trainer's CPU generator -> per accumulation micro-batch and rank: pack latents and noise into tokens,
    (x_t, target) = training_pair(path, x0, eps, t), out = model(x_t, ids, txt, vec, t), loss = mean over the
    batch of loss_weight(t) * mean((out - target)^2) -> backward -> all-reduce -> clip -> AdamW step -> EMA.
A step whose loss or gradient norm is not finite is skipped (no update), logged with the sample ids, and
counted; too many stop the run with a RectiflowError.
"""

from __future__ import annotations

import logging
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from rectiflow.convert.transformer import build_transformer, load_transformer
from rectiflow.data.cache_reader import LatentCache, NegativeLatents
from rectiflow.data.captions import CaptionPolicy
from rectiflow.data.couplings import CouplingsDataset, CouplingsWithData
from rectiflow.errors import ConfigError, FormatError, RectiflowError
from rectiflow.flow import (
    batch_negatives,
    contrastive_loss,
    differs,
    get_path,
    loss_weight,
    per_sample_loss,
    sample_timesteps,
    training_pair,
)
from rectiflow.flow.losses import check_loss
from rectiflow.models.family import family_of, model_params, sample_dims
from rectiflow.train import checkpoint as ckpt
from rectiflow.train.batches import BatchStream, local_slice, split_holdout
from rectiflow.train.config import RunConfig, config_to_dict, dump_toml
from rectiflow.train.distill import Distiller
from rectiflow.train.distributed import LocalContext, PlainStateIO
from rectiflow.train.guidance_distill import GuidanceDistiller, load_student
from rectiflow.train.lr_schedule import lr_factor
from rectiflow.train.metrics import MetricsLogger
from rectiflow.train.model_transforms import apply_activation_checkpointing, apply_regional_compile, unwrap
from rectiflow.train.resume import config_changes
from rectiflow.train.summary import expected_time, startup_summary

log = logging.getLogger(__name__)

__all__ = ["Trainer", "StepResult"]


@dataclass
class StepResult:
    step: int  # the step number after this step
    loss: float
    grad_norm: float
    lr: float
    applied: bool
    ids: list[str]
    samples: int


class Trainer:
    """Builds everything from a RunConfig; `fit()` trains to cfg.train.steps. Seams for distribution:
    `dist` (LocalContext interface), `parallelize(model, cfg.distributed) -> model` (applied after activation
    checkpointing / compile, before the optimizer is built), `state_io` (PlainStateIO interface)."""

    def __init__(self, cfg: RunConfig, *, dist=None, parallelize=None, state_io=None):
        self.cfg = cfg
        self.dist = dist or LocalContext(device=torch.device(cfg.train.device))
        self.state_io = state_io or PlainStateIO()
        self.device = torch.device(self.dist.device)
        self.out_dir = Path(cfg.train.out_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.path = get_path(cfg.flow.path)
        loss_weight(cfg.flow.loss_weight, torch.full((1,), 0.5), **cfg.flow.loss_weight_params)  # validate
        check_loss(cfg.flow.loss, cfg.flow.loss_params)
        self._setup_data()
        self._setup_model(parallelize)
        self.distiller = None  # few-step distillation: the teacher and the student's targets
        if cfg.distill.teacher:
            self.distiller = Distiller(cfg, self.cache, self.device, self.autocast)
        self.guidance_distiller = None  # guidance distillation: the teacher's CFG velocity as the target
        if cfg.guidance_distill.teacher:
            self.guidance_distiller = GuidanceDistiller(cfg, self.cache, self.device, self.autocast)
        self.lora_targets = None  # lora.guide / lora.preserve: the target's changes for a LoRA
        if cfg.lora.guide != 1.0 or cfg.lora.preserve:
            from rectiflow.train.lora import LoraTargets

            uncond = self.cache.text(self.cache.empty_caption_index)
            self.lora_targets = LoraTargets(cfg.lora, self.model, self.model_forward, uncond)
        self.generator = torch.Generator("cpu").manual_seed(cfg.train.seed)  # t and eps of every step
        self.step = 0
        self.bad_consecutive = self.bad_total = 0
        self._stop_signal: int | None = None
        self.metrics: MetricsLogger | None = None
        self.validator = None
        if cfg.validation.every and cfg.validation.holdout:
            from rectiflow.train.validation import Validator

            self.validator = Validator(
                cfg, self.holdout, device=self.device, flow_path=self.path,
                latent_channels=self.params.latent_channels, family=self.family, autocast=self.autocast,
                guidance_input=self.guidance_input, out_dir=self.out_dir, distiller=self.distiller,
                is_main=self.dist.is_main)

    # ---- setup -------------------------------------------------------------------------------------------

    def _setup_data(self) -> None:
        cfg = self.cfg
        policy = CaptionPolicy(mix=cfg.data.caption_mix, dropout={"default": cfg.data.caption_dropout})
        if cfg.data.couplings and cfg.data.mix_cache:  # reflow with the real-data loss mixed in
            real = LatentCache(cfg.data.cache, captions=policy, seed=cfg.train.seed)
            self.cache = CouplingsWithData(cfg.data.couplings, real, cfg.data.caption_dropout, cfg.train.seed)
        elif cfg.data.couplings:  # reflow: a teacher's fixed (noise, endpoint) pairs
            self.cache = CouplingsDataset(cfg.data.couplings, cfg.data.caption_dropout, seed=cfg.train.seed)
        elif not cfg.data.cache:
            raise ConfigError("data.cache is empty; set it to a cache directory made with `rectiflow cache` "
                              "(or data.couplings to one made with `rectiflow reflow pairs`)")
        else:
            self.cache = LatentCache(cfg.data.cache, captions=policy, seed=cfg.train.seed)
        # flow.contrastive = "counterfactual": row i's counterfactual image, read beside row i
        negatives = cfg.data.negative_cache
        self.negatives = NegativeLatents(negatives, self.cache) if negatives else None
        if cfg.model.autoencoder:  # validation grids and the bundle decode with it: it must be the cache's
            from rectiflow.convert.autoencoder import load_autoencoder

            self.cache.require_compatible(autoencoder=load_autoencoder(cfg.model.autoencoder))
        local_slice(cfg.data.batch_size, 0, cfg.optim.accumulation, 0, self.dist.world_size)  # divisibility
        train_idx, self.holdout = split_holdout(len(self.cache), cfg.validation.holdout, cfg.train.seed)
        self.stream = BatchStream(self.cache.bucket_ids(), train_idx, cfg.data.batch_size, cfg.train.seed)

    def _setup_model(self, parallelize) -> None:
        cfg = self.cfg
        # a guidance-distilled student embeds g
        extra = {"guidance_embed": True} if cfg.guidance_distill.teacher else {}
        params = model_params(cfg.model.preset, {**cfg.model.params, **extra})
        torch.manual_seed(cfg.train.seed)  # the random init is a function of the seed
        if cfg.model.init:
            model = self._load_init(params)
        else:
            model = build_transformer(params, device=self.device, dtype=torch.float32)
        self.params = model.params
        self.family = family_of(model.params)  # how to pack latents and call this model
        self._check_cache_fits()
        self.lora_base_hash = None
        if cfg.lora.rank:  # freeze the base, attach the adapters (before checkpointing / compile / DDP wrap)
            from rectiflow.train.lora import LoraStateIO, apply_training_lora

            self.lora_base_hash = apply_training_lora(model, cfg.lora)
            self.state_io = LoraStateIO(self.state_io)
        model.train()
        if cfg.train.activation_checkpointing:
            apply_activation_checkpointing(model)
        if cfg.train.compile:
            apply_regional_compile(model)
        self.model = parallelize(model, cfg.distributed) if parallelize is not None else model
        o = cfg.optim
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=o.lr,
                                           betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
        self.ema: dict[str, torch.Tensor] | None = None
        if cfg.ema.enabled:
            self.ema = {n: p.detach().clone() for n, p in self._trained_parameters()}

    def _trained_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        """(name, parameter) of what trains: every parameter, or the adapters of a LoRA run."""
        return [(n, p) for n, p in unwrap(self.model).named_parameters() if p.requires_grad]

    def _load_init(self, params):
        """model.init's weights (a guidance-distillation student may start from a teacher without the
        guidance embedding: rectiflow.train.guidance_distill.load_student)."""
        init = self.cfg.model.init
        try:
            return load_transformer(init, config=params, device=self.device, dtype=torch.float32)
        except FormatError:
            if not self.cfg.guidance_distill.teacher:
                raise
        return load_student(init, params, self.device)

    def guidance_input(self, b: int) -> torch.Tensor | None:
        """The guidance input [b] of guidance-distilled models (model.guidance), else None."""
        if not self.params.guidance_embed:
            return None
        return torch.full((b,), self.cfg.model.guidance, device=self.device)

    def _check_cache_fits(self) -> None:
        item = self.cache[0]
        p = self.params
        got = (item["latents"].shape[0], item["txt"].shape[-1], item["vec"].shape[-1])
        want = (p.latent_channels, p.context_in_dim, p.vec_in_dim)
        if got != want:
            what = f"couplings {self.cfg.data.couplings}" if self.cfg.data.couplings else \
                f"cache {self.cfg.data.cache}"
            raise ConfigError(f"{what} does not fit the model: latent / text / "
                              f"pooled widths {got}, model expects {want}; pick a matching preset or cache")

    # ---- one step ----------------------------------------------------------------------------------------

    def load_batch(self, indices: list[int]) -> dict:
        """Cache items stacked: latents [b, C, h, w], txt [b, L, D], vec [b, Dv], id (list), and
        negative_latents [b, C, h, w] with data.negative_cache. (A test seam.)"""
        batch = self.cache.get_batch(indices)
        if self.negatives is not None:
            batch["negative_latents"] = self.negatives.get_latents(indices)
        return batch

    def forward_loss(self, batch: dict, t: torch.Tensor, eps: torch.Tensor,
                     guidance: torch.Tensor | None = None) -> torch.Tensor:
        """Weighted flow-matching loss of one micro-batch (mean over it); t [b], eps [b, C, h, w]; guidance
        [b]: per-sample guidance inputs (guidance distillation), else model.guidance for guided models."""
        dev = self.device
        lat = batch["latents"].to(dev, torch.float32)
        b, _, h, w = lat.shape
        if "noise" in batch:  # reflow couplings: the noise paired with this endpoint, not fresh noise
            eps = batch["noise"]
        x0, noise = self.family.pack(lat), self.family.pack(eps.to(dev))  # model space, e.g. FLUX tokens
        t = t.to(dev)
        x_t, target = training_pair(self.path, x0, noise, t)
        txt, vec = batch["txt"].to(dev, torch.float32), batch["vec"].to(dev, torch.float32)
        guidance = self.guidance_input(b) if guidance is None else guidance.to(dev)
        if self.distiller is not None:
            target = self.distiller.target(x_t, t, txt, vec, h, w, guidance)
        if self.guidance_distiller is not None:
            target = self.guidance_distiller.target(x_t, t, txt, vec, h, w, guidance)
        x_in = self.path.model_input(x_t, t)
        if self.lora_targets is not None:  # lora.guide / lora.preserve
            target = self.lora_targets(batch["id"], target, x_in, t, txt, vec, h, w, guidance)
        out = self.model_forward(x_in, t, txt, vec, h, w, guidance)
        flow = self.cfg.flow
        per_sample = per_sample_loss(flow.loss, out, target, sample_dims(out), **flow.loss_params)  # [b]
        if flow.contrastive != "none":
            neg_target = self.negative_target(batch, x0, noise, t)
            negative = per_sample_loss(flow.loss, out, neg_target, sample_dims(out), **flow.loss_params)
            active = batch["caption_index"].to(dev) != self.cache.empty_caption_index
            if flow.contrastive == "counterfactual":  # rows kept as themselves have no negative
                active &= differs(lat, batch["negative_latents"].to(dev, torch.float32))
            per_sample = contrastive_loss(per_sample, negative, flow.contrastive_weight, active)
        weight = loss_weight(flow.loss_weight, t, **flow.loss_weight_params)
        return (weight * per_sample).mean()

    def negative_target(self, batch: dict, x0: torch.Tensor, noise: torch.Tensor,
                        t: torch.Tensor) -> torch.Tensor:
        """The flow target of each sample's negative at its t (rectiflow.flow.contrastive): another sample's
        (image, noise) pair, or the row's counterfactual image under the same noise."""
        if self.cfg.flow.contrastive == "batch":
            neg_x0, neg_noise = batch_negatives(x0, noise)
        else:
            neg_latents = batch["negative_latents"].to(self.device, torch.float32)
            neg_x0, neg_noise = self.family.pack(neg_latents), noise
        return training_pair(self.path, neg_x0, neg_noise, t)[1]

    def model_forward(self, x_in, t, txt, vec, h: int, w: int, guidance) -> torch.Tensor:
        """The model's output for model input x_in (model space) in the training precision."""
        with self.autocast():
            return self.family.forward(self.model, x_in, t, txt, vec, h, w, guidance)

    def autocast(self):
        """The precision context of every forward (train.precision: bf16 autocast, or none)."""
        if self.cfg.train.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return torch.autocast(self.device.type, enabled=False)

    def train_step(self) -> StepResult:
        cfg, dist = self.cfg, self.dist
        epoch, indices = self.stream.next()
        self.cache.set_epoch(epoch)
        n = len(indices)
        if self.distiller is not None:
            t = self.distiller.times(n, self.generator)  # [B] on the student's sampling grid
        else:
            t = sample_timesteps(cfg.flow.timesteps, n, self.generator, **cfg.flow.timestep_params)  # [B]
        shape = self.cache.latents(indices[0]).shape
        eps = torch.randn((n, *shape), generator=self.generator)  # [B, C, h, w]
        scales = self.guidance_distiller.scales(n, self.generator) if self.guidance_distiller else None
        losses, ids = [], []
        for m in range(cfg.optim.accumulation):
            sl = local_slice(n, m, cfg.optim.accumulation, dist.rank, dist.world_size)
            batch = self.load_batch(indices[sl])
            ids += batch["id"]
            loss = self.forward_loss(batch, t[sl], eps[sl], None if scales is None else scales[sl])
            (loss / cfg.optim.accumulation).backward()
            losses.append(loss.detach())
        loss = dist.all_reduce_mean(torch.stack(losses).mean())
        params = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        loss_v, norm_v = float(loss), float(grad_norm)
        applied = math.isfinite(loss_v) and math.isfinite(norm_v)
        lr = cfg.optim.lr * lr_factor(self.step, cfg.optim.warmup_steps, cfg.train.steps, cfg.optim.schedule,
                                      cfg.optim.min_lr_ratio)
        if applied:
            for g in self.optimizer.param_groups:
                g["lr"] = lr
            self.optimizer.step()
            self._update_ema()
            self.bad_consecutive = 0
        else:
            self._bad_step(loss_v, norm_v, ids)
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return StepResult(self.step, loss_v, norm_v, lr, applied, ids, n)

    @torch.no_grad()
    def _update_ema(self) -> None:
        if self.ema is None:
            return
        model_params = [p.detach() for _, p in self._trained_parameters()]
        ema = list(self.ema.values())
        if self.step < self.cfg.ema.start:
            # lerp with weight 1 returns `end` exactly (end - diff * 0) and, unlike _foreach_copy_, has a
            # DTensor sharding strategy (FSDP2)
            torch._foreach_lerp_(ema, model_params, 1.0)
        else:  # ema <- decay * ema + (1 - decay) * p
            torch._foreach_lerp_(ema, model_params, 1.0 - self.cfg.ema.decay)

    def _bad_step(self, loss: float, norm: float, ids: list[str]) -> None:
        self.bad_consecutive += 1
        self.bad_total += 1
        log.warning("step %d: non-finite loss %s / grad norm %s; step skipped (not applied); samples: %s",
                    self.step, loss, norm, ", ".join(ids))
        if self.metrics:
            self.metrics.log("skipped", self.step, {"loss": loss, "grad_norm": norm, "ids": ids})
        c = self.cfg.train
        if (c.max_bad_consecutive and self.bad_consecutive >= c.max_bad_consecutive) or \
                (c.max_bad_total and self.bad_total >= c.max_bad_total):
            raise RectiflowError(
                f"training stopped at step {self.step}: {self.bad_consecutive} consecutive / "
                f"{self.bad_total} total non-finite steps (limits train.max_bad_consecutive="
                f"{c.max_bad_consecutive}, max_bad_total={c.max_bad_total}); lower optim.lr or check the "
                "data (ids in the log), then resume from the last checkpoint")

    # ---- checkpoints -------------------------------------------------------------------------------------

    def save_checkpoint(self) -> Path | None:
        """Every rank gathers; the main rank writes `<out_dir>/checkpoints/step-N` and prunes old ones."""
        io = self.state_io
        model_sd = io.model_state(self.model)
        ema = {k: io.full_tensor(v) for k, v in self.ema.items()} if self.ema is not None else None
        if ema is not None:  # persistent buffers (SD3's position table) too, so ema.safetensors loads alone
            ema |= {k: v for k, v in model_sd.items() if k not in ema}
        optim_sd = io.optim_state(self.model, self.optimizer)
        path = None
        try:  # the barrier also when the main rank fails to write (the others would wait in it till timeout)
            if self.dist.is_main:
                state = {"data": self.stream.state_dict(), "bad_total": self.bad_total,
                         "bad_consecutive": self.bad_consecutive, "world_size": self.dist.world_size}
                if self.lora_base_hash is not None:  # the weights hold the adapters only
                    state["lora_base_hash"] = self.lora_base_hash
                path = ckpt.save_checkpoint(
                    self.ckpt_dir, self.step, model=model_sd, ema=ema, optimizer=optim_sd,
                    rng=ckpt.capture_rng({"noise": self.generator}), state=state,
                    config=config_to_dict(self.cfg), config_toml=dump_toml(self.cfg),
                    model_params=None if self.lora_base_hash else self.params.to_dict())
                ckpt.prune(self.ckpt_dir, self.cfg.checkpoint.keep)
        finally:
            self.dist.barrier()
        # every rank returns the path, so a final-step checkpoint is not written twice by non-main ranks
        return path if path is not None else self.ckpt_dir / ckpt.checkpoint_name(self.step)

    def resume(self, path: str | Path | None = None) -> Path:
        """Restore the full state from `path` or, when None, the newest complete checkpoint of out_dir."""
        path = Path(path) if path else ckpt.find_latest(self.ckpt_dir)
        if path is None:
            raise RectiflowError(f"no complete checkpoint in {self.ckpt_dir} to resume from; start without "
                                 "--resume")
        c = ckpt.load_checkpoint(path)
        if c.state.get("lora_base_hash") != self.lora_base_hash:
            raise RectiflowError(f"checkpoint {path} holds adapters for base weights "
                                 f"{c.state.get('lora_base_hash')} but model.init now has "
                                 f"{self.lora_base_hash}; resume with the same base")
        if c.config.get("model") is not None and c.model.keys() != self.state_io.state_keys(self.model):
            raise RectiflowError(f"checkpoint {path} holds a different model than the config; resume with "
                                 f"the config saved beside it ({path / 'config.toml'})")
        changes = config_changes(c.config, self.cfg)
        if changes and self.dist.is_main:  # once, at start: what differs from the run's saved config
            log.warning("resuming with %d change(s) to the run's saved config (the run will differ from an "
                        "uninterrupted one): %s", len(changes),
                        ", ".join(f"{k}={new!r} (was {old!r})" for k, old, new in changes))
        self.state_io.load_model_state(self.model, c.model)
        self.state_io.load_optim_state(self.model, self.optimizer, c.optimizer)
        if self.ema is not None:
            self.state_io.load_ema(self.ema, c.ema if c.ema is not None else c.model)
        ckpt.restore_rng(c.rng_tensors, c.rng_json, {"noise": self.generator})
        self.stream.load_state_dict(c.state["data"])
        self.bad_total = int(c.state.get("bad_total", 0))
        self.bad_consecutive = int(c.state.get("bad_consecutive", 0))
        self.step = c.step
        log.info("resumed from %s (step %d)", path, self.step)
        return path

    # ---- the loop ----------------------------------------------------------------------------------------

    def _on_signal(self, signum, frame) -> None:
        if self._stop_signal is not None:  # second Ctrl-C: stop now
            raise KeyboardInterrupt
        self._stop_signal = signum
        log.warning("interrupt: finishing step %d, then writing a checkpoint (Ctrl-C again to abort)",
                    self.step)

    def fit(self, stop_at: int | None = None) -> dict:
        """Train until cfg.train.steps (or an interrupt); checkpoint, validate, log; export at the end.
        stop_at: pause at this step instead (a checkpoint, no export); the learning-rate schedule still runs
        to cfg.train.steps, so pausing and resuming equals one uninterrupted run (`rectiflow study` scores
        runs part-way this way). Returns {"step", "loss", "interrupted", "checkpoint", "exports"}."""
        from tqdm.auto import tqdm

        cfg = self.cfg
        self.metrics = MetricsLogger(self.out_dir, cfg.logging.tensorboard, enabled=self.dist.is_main)
        handlers = self._install_signal_handlers()
        bar = tqdm(total=cfg.train.steps, initial=self.step, unit="step", desc="training",
                   disable=not (self.dist.is_main and cfg.train.progress))
        last, saved, t0, samples = None, None, time.perf_counter(), 0
        first_rate = True
        if self.dist.is_main:
            log.info("%s", startup_summary(self))
        try:
            end = cfg.train.steps if stop_at is None else min(stop_at, cfg.train.steps)
            while self.step < end and self._stop_signal is None:
                last = self.train_step()
                samples += last.samples
                bar.update(1)
                if self.step % cfg.train.log_every == 0 or self.step == cfg.train.steps:
                    rate = samples / max(time.perf_counter() - t0, 1e-9)
                    bar.set_postfix(loss=f"{last.loss:.4f}", samples_s=f"{rate:.1f}")
                    self.metrics.log("train", self.step, {"loss": last.loss, "grad_norm": last.grad_norm,
                                                          "lr": last.lr, "samples_per_s": rate})
                    if first_rate and self.dist.is_main:  # once: what to expect from here on
                        log.info("%s", expected_time(rate, cfg, self.step))
                    first_rate = False
                    t0, samples = time.perf_counter(), 0
                if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0:
                    saved = self.save_checkpoint()
                if self.validator is not None and self.step % cfg.validation.every == 0:
                    self.validator.run(self.step, self.model, self.ema, self.metrics)
            if saved is None or saved.name != ckpt.checkpoint_name(self.step):
                saved = self.save_checkpoint()
            interrupted = self._stop_signal is not None
            exports = [] if interrupted or self.step < cfg.train.steps else self.export()
        finally:
            bar.close()
            self.metrics.close()
            self._restore_signal_handlers(handlers)
        return {"step": self.step, "loss": last.loss if last else None, "interrupted": interrupted,
                "checkpoint": saved, "exports": exports}

    def _install_signal_handlers(self) -> dict:
        import threading

        if threading.current_thread() is not threading.main_thread():
            return {}
        old = {}
        for s in (signal.SIGINT, signal.SIGTERM):
            old[s] = signal.signal(s, self._on_signal)
        return old

    @staticmethod
    def _restore_signal_handlers(old: dict) -> None:
        for s, h in old.items():
            signal.signal(s, h)

    def export(self) -> list[Path]:
        """Final weights (EMA by default) in cfg.export.formats, and a bundle; main rank writes."""
        from rectiflow.train.export import export_weights

        io = self.state_io
        use_ema = self.cfg.export.ema and self.ema is not None
        sd = {k: io.full_tensor(v) for k, v in self.ema.items()} if use_ema else io.model_state(self.model)
        if self.lora_base_hash is not None:
            from rectiflow.train.lora import export_lora

            try:
                if not self.dist.is_main:
                    return []
                return export_lora(sd, self.cfg, base_hash=self.lora_base_hash, step=self.step,
                                   params=self.params, out=self.out_dir / "export")
            finally:
                self.dist.barrier()
        # EMA averages parameters only; persistent buffers (SD3's position table) come from the model
        sd |= {k: io.full_tensor(v) for k, v in unwrap(self.model).state_dict().items() if k not in sd}
        # leave together, also when writing fails: a rank that exits (and tears its gloo process group down
        # at exit) while the main rank still writes made the other rank abort ("terminate called without an
        # active exception") now and then in the two-process tests; a main rank that raised before the
        # barrier would leave the others waiting in it until the process-group timeout
        try:
            return export_weights(sd, self.params, self.out_dir / "export", self.cfg, self.cache.manifest) \
                if self.dist.is_main else []
        finally:
            self.dist.barrier()
