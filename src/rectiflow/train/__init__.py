"""rectiflow.train: training FLUX-style transformers on precomputed latents (`rectiflow train CONFIG`).

    from rectiflow.train import load_config, Trainer
    cfg = load_config("configs/tiny.toml", ["train.steps=100"])
    trainer = Trainer(cfg)          # builds data stream, model, optimizer, EMA from the config
    trainer.resume()                # optional: newest complete checkpoint of cfg.train.out_dir
    trainer.fit()                   # -> {"step", "loss", "interrupted", "checkpoint", "exports"}

Modules: config (RunConfig dataclasses, TOML + dotted overrides), trainer (Trainer, the step), run
(run_training: what `rectiflow train` does), checkpoint (atomic full-state checkpoints, safetensors + JSON),
batches (held-out split, resumable global batches, per-rank slices),
model_transforms (activation checkpointing / regional compile applied to a built model), distill (few-step
distillation: the teacher and the student's targets), validation (bucketed validation loss, sample grid),
metrics (JSONL + TensorBoard), export.

Seams for distributed training (rectiflow.train.distributed, which also holds the 1-process versions):
  Trainer(cfg, dist=..., parallelize=..., state_io=...)
  `run_training(cfg)` (what `rectiflow train` calls) does, when cfg.distributed.mode != "none":
      Trainer(cfg, **distributed.trainer_kwargs(cfg))
  where distributed.trainer_kwargs(cfg) -> {"dist": ..., "parallelize": ..., "state_io": ...}:
  - dist: an object with .device, .rank, .world_size, .local_rank, .is_main, .barrier(),
    .all_reduce_mean(tensor) -> tensor, .broadcast_object(obj) -> obj  (LocalContext is the 1-process one).
    The trainer uses dist.device for the model and data, only the main rank writes checkpoints/logs/exports.
  - parallelize(model, cfg.distributed) -> model: applied to the built fp32 model after activation
    checkpointing / compile and BEFORE the optimizer and EMA are created (DDP wrap or FSDP2 fully_shard per
    block of `model_transforms.transformer_blocks(model)`, then the root). EMA tensors are taken from
    unwrap(model).named_parameters() (DTensors under FSDP2; updated with torch._foreach_lerp_).
  - state_io: PlainStateIO interface: model_state(model) -> full CPU state dict, load_model_state(model, sd),
    optim_state(model, optim) -> full optimizer state_dict, load_optim_state(model, optim, sd),
    full_tensor(t) -> full CPU tensor (DTensor.full_tensor()), load_ema(ema, full_sd) (in place). All ranks
    call them (may be collectives).
  - Data: every rank draws the same GLOBAL batch (data.batch_size) and the same t / noise from the trainer's
    generator, then takes its slice `batches.local_slice(B, micro, accumulation, rank, world_size)`; so N
    ranks train on exactly what one process with the same global batch does (gradients averaged by
    DDP/FSDP, loss averaged with dist.all_reduce_mean).
  - Checkpoint utilities for other trainers (e.g. train-ae): checkpoint.save_checkpoint / load_checkpoint /
    find_latest / prune / capture_rng / restore_rng (model, ema, optimizer state as safetensors).
"""

from __future__ import annotations

from rectiflow.lazy_exports import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    "RunConfig": ".config", "load_config": ".config", "config_from_dict": ".config",
    "config_to_dict": ".config", "dump_toml": ".config",
    "Trainer": ".trainer", "run_training": ".run", "LocalContext": ".distributed",
    "PlainStateIO": ".distributed", "lr_factor": ".lr_schedule",
    "save_checkpoint": ".checkpoint", "load_checkpoint": ".checkpoint", "find_latest": ".checkpoint",
    "apply_activation_checkpointing": ".model_transforms", "apply_regional_compile": ".model_transforms",
    "MetricsLogger": ".metrics", "read_metrics": ".metrics",
})
