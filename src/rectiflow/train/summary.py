"""What `rectiflow train` says at start: model size, data, held-out split, steps, outputs."""

from __future__ import annotations

from rectiflow.train.model_transforms import unwrap

__all__ = ["startup_summary", "expected_time"]


def startup_summary(trainer) -> str:
    """A few lines about what `trainer` (a rectiflow.train.trainer.Trainer) will do."""
    cfg, p = trainer.cfg, trainer.params
    n_params = sum(t.numel() for t in unwrap(trainer.model).parameters())  # DTensors: global sizes
    c, h, w = trainer.cache.latents(0).shape
    n, held = len(trainer.cache), len(trainer.holdout)
    steps, batch = cfg.train.steps, cfg.data.batch_size
    epochs = steps * batch / max(1, n - held)
    blocks = trainer.family.describe(p)
    return "\n".join([
        f"model: {cfg.model.preset} transformer, {n_params / 1e6:.2f}M parameters ({blocks}), "
        f"{cfg.train.precision} on {trainer.device}",
        f"data: {n} samples in {cfg.data.cache}: {n - held} to train on, {held} held out for validation; "
        f"latents {c}x{h}x{w} ({trainer.family.image_tokens(h, w, p)} image tokens), caption dropout "
        f"{cfg.data.caption_dropout:g}",
        f"steps: {steps} of batch {batch} ({epochs:.1f} epochs), {max(0, steps - trainer.step)} to go from "
        f"step {trainer.step}; validation every {cfg.validation.every or 'never'}, checkpoint every "
        f"{cfg.checkpoint.every or 'end'}; writing to {trainer.out_dir}",
    ])


def expected_time(samples_per_s: float, cfg, step: int) -> str:
    """The measured throughput and the time the steps after `step` will take at it."""
    left = cfg.train.steps - step
    minutes = left * cfg.data.batch_size / max(samples_per_s, 1e-9) / 60
    return (f"throughput: {samples_per_s:.1f} samples/s measured over the first steps: about "
            f"{minutes:.1f} min for the remaining {left} steps")
