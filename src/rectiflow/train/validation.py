"""Validation during training: bucketed validation loss (SD3 protocol) and a sample grid.

Validation loss (Esser et al. 2024, SD3, sec. 5.1 and app. B.2: the loss on held-out data, with fixed
noise, evaluated at fixed timesteps, which tracks sample quality): the `validation.holdout` cache samples
that training never sees, each with one fixed caption (no dropout) and one fixed noise draw (seeded by
validation.seed), are evaluated at t_k = (k + 0.5) / K for K = validation.buckets. Reported per bucket
("loss_t0.062", ...) and their mean ("loss"), unweighted MSE against the path's target. When distilling
(cfg.distill.teacher), the loss is the distillation loss instead: at each time of the student's grid
(1, 1 - dt, ..., dt), MSE against the teacher's two-half-step target (Distiller.target), so it measures
what the student is trained for.

Sample grid: every prompt x seed (prompts: validation.prompts, or else validation.data_prompts captions of
the dataset itself, held-out samples' first), sampled from t = 1 to 0 with a rectiflow.flow solver (true
CFG with the cached "" embedding when cfg_scale > 1), decoded with model.autoencoder, saved as
out_dir/samples/step-N.png (rows: prompts, columns: seeds, both labelled). Needs the text encoder recorded
in the cache manifest (rectiflow.models.text.text_encoder_from_spec) and an autoencoder; without them it is
skipped with a log line. `Validator.text_encoder` / `Validator.decode` can also be set directly.

The Validator gets everything it uses as explicit arguments (the run config, the held-out indices, device,
flow path, the precision context, ...) and the model, EMA and metrics logger per `run`; it does not reach
into the Trainer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import numpy as np
import torch

from rectiflow.data.cache_reader import LatentCache
from rectiflow.data.captions import CaptionPolicy
from rectiflow.data.grid import labelled_grid
from rectiflow.flow import Path as FlowPath
from rectiflow.flow import cfg_batch, cfg_guide, solve, timestep_grid, training_pair
from rectiflow.models.family import ModelFamily, sample_dims
from rectiflow.train.config import RunConfig
from rectiflow.train.metrics import MetricsLogger
from rectiflow.train.model_transforms import unwrap

log = logging.getLogger(__name__)

__all__ = ["Validator", "bucket_times", "data_prompts"]


def bucket_times(k: int) -> list[float]:
    """Bucket centres (i + 0.5) / k."""
    return [(i + 0.5) / k for i in range(k)]


def data_prompts(cache: LatentCache, holdout: list[int], n: int) -> list[str]:
    """Up to `n` distinct non-empty captions of the dataset: those of the held-out samples first (images
    the model never trains on), then of samples spread evenly over the cache."""
    if n <= 0:
        return []
    captions = cache.manifest["captions"]
    step = max(1, len(cache) // (4 * n))
    out: list[str] = []
    for i in [*holdout, *range(0, len(cache), step)]:
        text = captions[cache.caption_index(i)]
        if text and text not in out:
            out.append(text)
            if len(out) == n:
                break
    return out


class Validator:
    """Validation of one run. `family`: the model's family (packing, the forward call); `guidance_input(b)`
    gives the guidance input [b] of guidance-distilled models (else None); `autocast()` is the training
    precision context; `distiller` the run's Distiller, if any."""

    def __init__(self, run_cfg: RunConfig, holdout: list[int], *, device: torch.device, flow_path: FlowPath,
                 latent_channels: int, family: ModelFamily, autocast: Callable[[], AbstractContextManager],
                 guidance_input: Callable[[int], torch.Tensor | None], out_dir: Path, distiller=None,
                 is_main: bool = True):
        self.cfg = run_cfg.validation
        self.autoencoder_path = run_cfg.model.autoencoder
        self.device, self.flow_path, self.latent_channels = device, flow_path, latent_channels
        self.family = family
        self.autocast, self.guidance_input, self.distiller = autocast, guidance_input, distiller
        self.out_dir, self.is_main = Path(out_dir), is_main
        policy = CaptionPolicy(mix=run_cfg.data.caption_mix)  # no dropout: the conditional loss
        cache = LatentCache(run_cfg.data.cache, captions=policy, seed=run_cfg.train.seed)
        g = torch.Generator().manual_seed(self.cfg.seed)
        by_shape: dict[tuple, list[dict]] = {}
        for i in holdout:
            item = cache[i]
            item["eps"] = torch.randn(item["latents"].shape, generator=g)  # fixed noise [C, h, w]
            by_shape.setdefault(tuple(item["latents"].shape), []).append(item)
        self.groups = [{k: torch.stack([it[k] for it in items]) for k in ("latents", "txt", "vec", "eps")}
                       for items in by_shape.values()]
        self.cache = cache
        self.prompts = list(self.cfg.prompts) or data_prompts(cache, holdout, self.cfg.data_prompts)
        self.text_encoder = None
        self.decode = None
        self._loaded_decoders = False

    def run(self, step: int, model: torch.nn.Module, ema: dict[str, torch.Tensor] | None = None,
            metrics: MetricsLogger | None = None) -> dict[str, float]:
        """Validation loss of `model` (its EMA weights `ema` when validation.use_ema), and the sample grid
        when prompts are set; logs (to `metrics` too) and returns the numbers."""
        backup = None
        if self.cfg.use_ema and ema is not None:
            # EMA covers what trains (every parameter, or a LoRA run's adapters alone)
            backup = {n: p.detach().clone() for n, p in unwrap(model).named_parameters() if n in ema}
            self._copy_params(unwrap(model), ema)
        was_training = model.training
        model.eval()
        try:
            values = self.loss(model)
            if self.prompts:
                self.sample_grid(model, step)
        finally:
            model.train(was_training)
            if backup is not None:
                self._copy_params(unwrap(model), backup)
        log.info("step %d: validation loss %.5f", step, values["loss"])
        if metrics:
            metrics.log("val", step, values)
        return values

    @staticmethod
    @torch.no_grad()
    def _copy_params(model, src: dict[str, torch.Tensor]) -> None:
        for n, p in model.named_parameters():
            if n in src:
                p.copy_(src[n])

    def times(self) -> list[float]:
        """The validation timesteps: SD3's bucket centres, or the student's grid when distilling."""
        if self.distiller is not None:
            return self.distiller.grid().tolist()
        return bucket_times(self.cfg.buckets)

    @torch.no_grad()
    def loss(self, model) -> dict[str, float]:
        dev, path = self.device, self.flow_path
        out: dict[str, float] = {}
        for t_k in self.times():
            total, count = 0.0, 0
            for g in self.groups:
                lat = g["latents"].to(dev, torch.float32)
                b, _, h, w = lat.shape
                t = torch.full((b,), t_k, device=dev)
                x0, eps = self.family.pack(lat), self.family.pack(g["eps"].to(dev))  # model space
                x_t, target = training_pair(path, x0, eps, t)
                if self.distiller is not None:
                    txt, vec = g["txt"].to(dev, torch.float32), g["vec"].to(dev, torch.float32)
                    target = self.distiller.target(x_t, t, txt, vec, h, w, self.guidance_input(b))
                pred = self._forward(model, path.model_input(x_t, t), h, w, g["txt"], g["vec"], t)
                total += float((pred.float() - target).pow(2).mean(dim=sample_dims(pred)).sum())
                count += b
            out[f"loss_t{t_k:.3f}"] = total / count
        out["loss"] = sum(out.values()) / len(out)
        return out

    def _forward(self, model, x, h: int, w: int, txt, vec, t):
        dev, b = self.device, x.shape[0]
        txt, vec = txt.to(dev, torch.float32), vec.to(dev, torch.float32)
        with self.autocast():
            return self.family.forward(model, x, t, txt, vec, h, w, self.guidance_input(b))

    # ---- sample grid -------------------------------------------------------------------------------------

    def _load_decoders(self) -> None:
        if self._loaded_decoders:
            return
        self._loaded_decoders = True
        if self.text_encoder is None:
            try:
                from rectiflow.models.text import text_encoder_from_spec

                self.text_encoder = text_encoder_from_spec(self.cache.manifest["text_encoder"]["spec"])
            except Exception as e:  # noqa: BLE001 - any failure only disables the optional grid
                log.warning("no sample grid: cannot build the cache's text encoder (%s)", e)
        if self.decode is None and self.autoencoder_path:
            from rectiflow.convert.autoencoder import load_autoencoder

            ae = load_autoencoder(self.autoencoder_path, device=self.device)
            self.decode = ae.decode
        elif self.decode is None:
            log.warning("no sample grid: set model.autoencoder to decode samples")

    @torch.no_grad()
    def sample(self, model, prompts: list[str], seeds: list[int], h: int, w: int) -> torch.Tensor:
        """Latents [len(prompts) * len(seeds), C, h, w] (prompt-major), noise from CPU generators per seed."""
        c, dev, path = self.cfg, self.device, self.flow_path
        txt, vec = self.text_encoder.encode(prompts)  # [P, L, D], [P, Dv]
        txt = txt.repeat_interleave(len(seeds), 0).to(dev)  # [P*S, L, D]
        vec = vec.repeat_interleave(len(seeds), 0).to(dev)  # [P*S, Dv]
        chans = self.latent_channels
        noise = torch.cat([torch.randn(1, chans, h, w, generator=torch.Generator().manual_seed(s))
                           for _ in prompts for s in seeds])  # [P*S, C, h, w]
        x = self.family.pack(noise.to(dev))  # model space, e.g. FLUX tokens [P*S, L_img, 4C]
        n = x.shape[0]
        if c.cfg_scale > 1:
            t_u, v_u = self.cache.text(self.cache.empty_caption_index)
            txt = cfg_batch(txt, t_u.expand(n, -1, -1).to(dev, txt.dtype))  # [2n, L, D]
            vec = cfg_batch(vec, v_u.expand(n, -1).to(dev, vec.dtype))

        def velocity(x_, t_):
            xx = torch.cat([x_, x_]) if c.cfg_scale > 1 else x_
            tb = t_.to(dev, torch.float32).expand(xx.shape[0])  # [B]
            out = self._forward(model, path.model_input(xx, tb), h, w, txt, vec, tb).float()
            v = path.to_velocity(out, xx, tb)
            return cfg_guide(v, c.cfg_scale) if c.cfg_scale > 1 else v

        tokens = self.family.image_tokens(h, w, getattr(unwrap(model), "params", None))
        grid = timestep_grid(c.sample_steps, shift=c.shift, seq_len=tokens)
        return self.family.unpack(solve(velocity, x, grid, method=c.sampler), h, w)  # [P*S, C, h, w]

    def sample_grid(self, model, step: int) -> Path | None:
        self._load_decoders()
        if self.text_encoder is None or self.decode is None:
            return None
        from PIL import Image

        size = self.cfg.sample_size
        lh, lw = (size // 8, size // 8) if size else tuple(self.groups[0]["latents"].shape[-2:])
        z = self.sample(model, self.prompts, self.cfg.seeds, lh, lw)
        with torch.no_grad():
            imgs = self.decode(z).float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8).cpu()
        pics = [Image.fromarray(np.ascontiguousarray(im.permute(1, 2, 0).numpy())) for im in imgs]  # h w c
        c = self.cfg
        cols = [f"seed {s}" for s in c.seeds]
        cols[0] = f"step {step}, cfg {c.cfg_scale:g}: {cols[0]}"
        sheet = labelled_grid(pics, self.prompts, cols, scale=max(1, 128 // max(pics[0].size)))
        out = self.out_dir / "samples" / f"step-{step:09d}.png"
        if self.is_main:
            out.parent.mkdir(parents=True, exist_ok=True)
            sheet.save(out)
            log.info("saved sample grid %s", out)
        return out
