"""Autoencoder training (`rectiflow train-ae`): reconstruction + KL for new domains and small latents.

Loss per image (LDM / FLUX autoencoder objective without the perceptual and adversarial terms, which need
pretrained networks this project does not download):
    l1_weight * |x - D(z)| + mse_weight * (x - D(z))^2  (pixel means)  +  kl_weight * KL(q(z|x) || N(0, I))
with z sampled from the posterior (reparameterised). After training, the latent statistics of the training
images set the normalisation: shift_factor = mean, scale_factor = 1 / std of the posterior means, so
`encode` gives latents of unit variance, the regime the transformer's flow assumes (FLUX's 0.3611 / 0.1159
were obtained the same way for its autoencoder).

Images are decoded once and held in RAM as uint8 ([N, 3, S, S]; 20k images at 64 px = 250 MB). The run is
resumable: atomic checkpoints (model, optimizer, step, every RNG) in OUT/checkpoints, exact on CPU.
Outputs: OUT/ae.safetensors (rectiflow format, loadable by load_autoencoder), OUT/report.json (losses, PSNR
on held-out images, latent statistics), OUT/metrics.jsonl, OUT/recon.png (held-out originals over
reconstructions).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from rectiflow.convert.autoencoder import build_autoencoder, save_autoencoder
from rectiflow.data.sources import open_source
from rectiflow.data.transforms import IMAGE_ERRORS, resize_center_crop
from rectiflow.errors import ConfigError
from rectiflow.models.autoencoder import AutoEncoder, autoencoder_params
from rectiflow.train.checkpoint import (
    capture_rng,
    find_latest,
    load_checkpoint,
    prune,
    restore_rng,
    save_checkpoint,
)
from rectiflow.train.lr_schedule import lr_factor
from rectiflow.train.metrics import MetricsLogger

__all__ = ["AETrainConfig", "load_images", "train_autoencoder", "latent_stats", "psnr"]

log = logging.getLogger(__name__)


@dataclass
class AETrainConfig:
    data: str  # any source rectiflow.data.open_source reads (imagefolder, txt captions, webdataset, classes)
    out: str
    preset: Any = "small"  # autoencoder preset name, or a dict of AutoEncoderParams fields
    size: int = 64
    crop: int = 0  # train on random crops of this side (multiple of 8; 0 = whole images): convolutions
    # make the cost per image scale with the crop area, and the model still encodes whole images
    steps: int = 2000
    batch_size: int = 32
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    l1_weight: float = 1.0
    mse_weight: float = 1.0
    kl_weight: float = 1e-6  # LDM's KL-f8 autoencoders use 1e-6 (Rombach et al. 2022, appendix)
    max_images: int | None = None
    holdout: int = 256  # images kept out of training for PSNR
    seed: int = 0
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 50
    stats_images: int = 2048
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        autoencoder_params(self.preset)  # unknown preset -> ConfigError now, not after loading data
        for name in ("steps", "batch_size", "size"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"train-ae: {name} must be >= 1, got {getattr(self, name)}")
        if self.crop and (self.crop % 8 or not 8 <= self.crop <= self.size):
            raise ConfigError(f"train-ae: crop {self.crop} must be a multiple of 8 between 8 and size "
                              f"{self.size}")


def load_images(data: str, size: int, max_images: int | None = None, progress: bool = True) -> torch.Tensor:
    """Every readable image of the source, resized/centre-cropped to size x size: uint8 [N, 3, S, S]."""
    source = open_source(data)
    n = len(source) if max_images is None else min(len(source), max_images)
    if n == 0:
        raise ConfigError(f"{data}: no images found")
    out = torch.empty(n, 3, size, size, dtype=torch.uint8)
    kept = 0
    for i in tqdm(range(n), desc="loading images", unit="img", disable=not progress):
        try:
            img = resize_center_crop(source.load_image(i), size, size)
        except IMAGE_ERRORS as e:
            source.report("unreadable_image", source[i].location, str(e))
            continue
        out[kept] = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)  # HWC -> CHW
        kept += 1
    return out[:kept]


def _to_float(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float32) / 127.5 - 1.0  # uint8 -> [-1, 1]


def psnr(x: torch.Tensor, y: torch.Tensor) -> float:
    """PSNR in dB of images in [-1, 1] (peak-to-peak 2), over the whole batch."""
    mse = torch.mean((x.clamp(-1, 1) - y.clamp(-1, 1)) ** 2).item()
    return float("inf") if mse == 0 else 10 * math.log10(4.0 / mse)


@torch.no_grad()
def latent_stats(ae: AutoEncoder, images: torch.Tensor, batch_size: int = 64) -> tuple[float, float]:
    """(mean, std) over all elements of the posterior means of `images` (uint8), un-normalised."""
    total, total_sq, count = 0.0, 0.0, 0
    for s in range(0, len(images), batch_size):
        mean, _ = ae.encode_moments(_to_float(images[s:s + batch_size]))
        total += mean.double().sum().item()
        total_sq += (mean.double() ** 2).sum().item()
        count += mean.numel()
    m = total / count
    return m, math.sqrt(max(total_sq / count - m * m, 1e-12))


def _loss(ae: AutoEncoder, x: torch.Tensor, cfg: AETrainConfig, gen: torch.Generator):
    mean, logvar = ae.encode_moments(x)
    eps = torch.randn(mean.shape, generator=gen)
    z = mean + torch.exp(0.5 * logvar) * eps  # reparameterised posterior sample
    rec = ae.decoder(z)
    l1 = (rec - x).abs().mean()
    mse = ((rec - x) ** 2).mean()
    kl = 0.5 * (mean ** 2 + logvar.exp() - 1 - logvar).sum(dim=(1, 2, 3)).mean()
    total = cfg.l1_weight * l1 + cfg.mse_weight * mse + cfg.kl_weight * kl
    return total, {"l1": l1.item(), "mse": mse.item(), "kl": kl.item()}


def _lr(step: int, cfg: AETrainConfig) -> float:
    return cfg.lr * lr_factor(step, cfg.warmup, cfg.steps, "cosine", 0.1)  # warmup, then cosine to 10%


def train_autoencoder(cfg: AETrainConfig, resume: bool = False, progress: bool = True,
                      images: torch.Tensor | None = None) -> dict[str, Any]:
    """Train, write OUT/ae.safetensors with data-derived scale/shift; returns the report dict."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    images = load_images(cfg.data, cfg.size, cfg.max_images, progress) if images is None else images
    hold = min(cfg.holdout, len(images) // 10)
    train, held = images[hold:], images[:hold]
    if len(train) < 1:
        raise ConfigError(f"train-ae: {len(images)} images are too few")
    torch.manual_seed(cfg.seed)
    # channels_last: oneDNN's CPU convolutions (forward + backward) ran 1.1-1.2x faster in that layout here
    ae = build_autoencoder(cfg.preset).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(ae.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99))
    gen = torch.Generator().manual_seed(cfg.seed)
    step = 0
    ckpt_root = out / "checkpoints"
    config = dataclasses.asdict(cfg)
    if resume and (latest := find_latest(ckpt_root)) is not None:
        ck = load_checkpoint(latest)
        ae.load_state_dict(ck.model, strict=True)
        opt.load_state_dict(ck.optimizer)
        restore_rng(ck.rng_tensors, ck.rng_json, {"data": gen})
        step = ck.step
        log.info("resumed from %s (step %d)", latest, step)
    metrics = MetricsLogger(out, tensorboard=False, path=out / "metrics.jsonl")  # closed in the finally
    t0, bar = time.time(), tqdm(total=cfg.steps, initial=step, desc="train-ae", unit="step",
                                disable=not progress)
    first_step, timed = step + 1, None  # the loop's time from the end of this call's first step (allocations)
    ae.train()
    try:
        while step < cfg.steps:
            idx = torch.randint(len(train), (cfg.batch_size,), generator=gen)
            x = train[idx]
            if cfg.crop and cfg.crop < cfg.size:  # one crop window per batch, on the 8-pixel latent grid
                cells = (cfg.size - cfg.crop) // 8 + 1
                oy, ox = (8 * int(v) for v in torch.randint(cells, (2,), generator=gen))
                x = x[:, :, oy:oy + cfg.crop, ox:ox + cfg.crop]
            x = _to_float(x).contiguous(memory_format=torch.channels_last)
            if torch.rand((), generator=gen) < 0.5:  # horizontal flips: free augmentation
                x = x.flip(-1)
            for g in opt.param_groups:
                g["lr"] = _lr(step, cfg)
            loss, parts = _loss(ae, x, cfg, gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(ae.parameters(), cfg.grad_clip)
            opt.step()
            step += 1
            if step == first_step:
                timed = (time.perf_counter(), time.process_time())
            bar.update(1)
            if step % cfg.log_every == 0 or step == cfg.steps:
                metrics.log("train", step, {"loss": loss.item(), **parts, "lr": _lr(step - 1, cfg),
                                            "elapsed_s": round(time.time() - t0, 1)})
                bar.set_postfix(loss=f"{loss.item():.4f}", l1=f"{parts['l1']:.4f}")
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                weights = {k: v.detach().contiguous().clone() for k, v in ae.state_dict().items()}
                save_checkpoint(ckpt_root, step, model=weights,
                                ema=None, optimizer=opt.state_dict(), rng=capture_rng({"data": gen}),
                                state={"kind": "autoencoder"}, config=config, config_toml="",
                                model_params=ae.params.to_dict())
                prune(ckpt_root, cfg.keep_checkpoints)
    finally:
        bar.close()
        metrics.close()
    report = _finish(ae, cfg, train, held, out)
    if timed is not None and step > first_step:  # what a step costs, for budgets (rectiflow quickstart)
        report["step_time"] = {"steps": step - first_step, "wall_s": time.perf_counter() - timed[0],
                               "cpu_s": time.process_time() - timed[1]}
    return report


@torch.no_grad()
def _finish(ae: AutoEncoder, cfg: AETrainConfig, train: torch.Tensor, held: torch.Tensor, out: Path) -> dict:
    ae.eval()
    m, s = latent_stats(ae, train[: cfg.stats_images])
    params = dataclasses.replace(ae.params, scale_factor=round(1.0 / s, 6), shift_factor=round(m, 6),
                                 resolution=cfg.size)
    final = AutoEncoder(params)
    final.load_state_dict(ae.state_dict())
    final.eval()
    report: dict[str, Any] = {"steps": cfg.steps, "params": params.to_dict(), "latent_mean": m,
                              "latent_std": s, "images": len(train), "heldout_images": len(held)}
    if len(held):
        x = _to_float(held)
        rec = torch.cat([final.decode(final.encode(x[i:i + 64])) for i in range(0, len(x), 64)])
        report["heldout_psnr_db"] = round(psnr(rec, x), 3)
        _save_recon(x[:8], rec[:8], out / "recon.png")
    save_autoencoder(final, out / "ae.safetensors", format="rectiflow",
                     metadata={"rectiflow.train_ae": json.dumps(dataclasses.asdict(cfg), default=str)})
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    report["path"] = str(out / "ae.safetensors")
    return report


def _save_recon(x: torch.Tensor, rec: torch.Tensor, path: Path) -> None:
    from PIL import Image

    # originals above reconstructions: [3, 2S, nS]
    grid = torch.cat([torch.cat(list(x), dim=-1), torch.cat(list(rec.clamp(-1, 1)), dim=-1)], dim=-2)
    arr = ((grid + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    Image.fromarray(arr).save(path)
