"""Distributed training: DDP or FSDP2 over processes started by torchrun (the seams of rectiflow.train).

    torchrun --standalone --nproc_per_node 2 -m rectiflow train configs/tiny.toml distributed.mode=ddp

`run_training(cfg)` calls `trainer_kwargs(cfg)` when cfg.distributed.mode != "none" and passes the result to
`Trainer(cfg, **kwargs)`:
  - dist: a DistContext (rank, world size, device; barrier / all-reduce / broadcast over torch.distributed).
    The process group comes from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT):
    gloo on CPU, nccl on CUDA (one GPU per process: cuda:LOCAL_RANK). Ranks other than 0 log warnings only.
  - parallelize(model, cfg.distributed): "ddp" wraps the model in DistributedDataParallel (gradients
    averaged over ranks in the backward); "fsdp2" applies torch.distributed.fsdp.fully_shard to every
    transformer block, then to the root (parameters, gradients and AdamW state sharded along dim 0).
  - state_io: PlainStateIO for DDP; FSDP2StateIO for FSDP2, which gathers full, CPU state dicts with the
    torch.distributed.checkpoint.state_dict APIs (full_state_dict + cpu_offload) so that a checkpoint is the
    same single-file safetensors layout as a 1-process run (optimizer state keyed by parameter index, as
    torch.optim's own state_dict) and loads, or resumes, in any number of processes.
Every rank draws the same global batch and noise and trains on its slice
(rectiflow.train.batches.local_slice), so N ranks reproduce one process with the same global batch
(tests/train/test_distributed.py).
Run as a single process (no torchrun, or WORLD_SIZE=1) everything here is a no-op: LocalContext, the model
unchanged, PlainStateIO.
"""

from __future__ import annotations

import atexit
import functools
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as tdist
from torch import nn

from rectiflow.errors import ConfigError
from rectiflow.train.config import DistributedConfig, RunConfig
from rectiflow.train.model_transforms import transformer_blocks, unwrap

log = logging.getLogger(__name__)

__all__ = ["DistContext", "FSDP2StateIO", "LocalContext", "PlainStateIO", "launch_env", "init_distributed",
           "parallelize", "trainer_kwargs"]


# ---- process group ----------------------------------------------------------------------------------------


def launch_env(environ: dict[str, str] | None = None) -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment; (0, 1, 0) when not launched by it."""
    env = os.environ if environ is None else environ

    def read(name: str, default: int) -> int:
        text = env.get(name)
        if text is None or text == "":
            return default
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"environment variable {name}={text!r} is not an integer; launch with "
                              "torchrun, which sets RANK, WORLD_SIZE and LOCAL_RANK") from None

    world = read("WORLD_SIZE", 1)
    rank = read("RANK", 0)
    local = read("LOCAL_RANK", rank)
    if world < 1 or not 0 <= rank < world or local < 0:
        raise ConfigError(f"RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local} are inconsistent; launch "
                          "with torchrun --nproc_per_node N")
    return rank, world, local


@dataclass
class LocalContext:
    """The single-process `dist` seam of Trainer (DistContext below is the N-process one)."""

    device: torch.device = torch.device("cpu")
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        pass

    def all_reduce_mean(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def broadcast_object(self, obj):
        return obj


class PlainStateIO:
    """Full state dicts of an unsharded (or DDP-wrapped) model and its optimizer. FSDP2 swaps in one that
    gathers full state on save and scatters it on load; every rank calls these (they may be collectives)."""

    def model_state(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        return {k: v.detach().to("cpu", copy=True) for k, v in unwrap(model).state_dict().items()}

    def state_keys(self, model: torch.nn.Module) -> set[str]:
        """The keys model_state returns (without gathering anything)."""
        return set(unwrap(model).state_dict().keys())

    def load_model_state(self, model: torch.nn.Module, sd: dict[str, torch.Tensor]) -> None:
        unwrap(model).load_state_dict(sd, strict=True)

    def optim_state(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        return optimizer.state_dict()

    def load_optim_state(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, sd: dict) -> None:
        optimizer.load_state_dict(sd)

    def full_tensor(self, t: torch.Tensor) -> torch.Tensor:
        return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().to("cpu", copy=True)

    @torch.no_grad()
    def load_ema(self, ema: dict[str, torch.Tensor], full: dict[str, torch.Tensor]) -> None:
        """ema[k] <- full[k] in place (full: CPU tensors of a checkpoint)."""
        for k, v in ema.items():
            v.copy_(full[k])


@dataclass
class DistContext:
    """The `dist` seam for N > 1 processes of an initialised default process group."""

    device: torch.device
    rank: int
    world_size: int
    local_rank: int
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.device.type == "cuda":
            tdist.barrier(device_ids=[self.device.index])
        else:
            tdist.barrier()

    def all_reduce_mean(self, t: torch.Tensor) -> torch.Tensor:
        # SUM / N rather than ReduceOp.AVG: gloo has no AVG.
        out = t.detach().to(self.device, copy=True)
        tdist.all_reduce(out, op=tdist.ReduceOp.SUM)
        return out / self.world_size

    def broadcast_object(self, obj: Any) -> Any:
        box = [obj]
        tdist.broadcast_object_list(box, src=0, device=self.device if self.backend == "nccl" else None)
        return box[0]


def _device(cfg: RunConfig, local_rank: int) -> torch.device:
    dev = torch.device(cfg.train.device)
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise ConfigError(f"train.device={cfg.train.device!r} is not supported for distributed training; use "
                          "cpu (gloo) or cuda (nccl)")
    if not torch.cuda.is_available() or torch.cuda.device_count() <= local_rank:
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        raise ConfigError(f"LOCAL_RANK={local_rank} needs GPU {local_rank} but {n} are visible; start at "
                          f"most {n} processes per node (torchrun --nproc_per_node) or set train.device=cpu")
    return torch.device("cuda", local_rank)  # one GPU per process: cuda:LOCAL_RANK


def _destroy() -> None:
    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()


def init_distributed(cfg: RunConfig) -> DistContext | LocalContext:
    """Join the process group torchrun set up (gloo on CPU, nccl on CUDA); LocalContext for 1 process."""
    rank, world, local = launch_env()
    if world == 1:
        return LocalContext(device=torch.device(cfg.train.device))
    if not tdist.is_available():
        raise ConfigError("this torch build has no torch.distributed; set distributed.mode=none")
    device = _device(cfg, local)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not tdist.is_initialized():
        tdist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
        atexit.register(_destroy)
    elif tdist.get_world_size() != world or tdist.get_rank() != rank:
        raise ConfigError(f"an existing process group (rank {tdist.get_rank()} of {tdist.get_world_size()}) "
                          f"does not match RANK={rank}, WORLD_SIZE={world}")
    if rank != 0:  # only rank 0 logs progress; warnings and errors still come from every rank
        logging.getLogger("rectiflow").setLevel(logging.WARNING)
    log.info("distributed %s: %d processes, backend %s, device %s", cfg.distributed.mode, world, backend,
             device)
    return DistContext(device=device, rank=rank, world_size=world, local_rank=local, backend=backend)


# ---- parallelize ------------------------------------------------------------------------------------------

def parallelize(model: nn.Module, dist_cfg: DistributedConfig, *,
                device: torch.device | None = None) -> nn.Module:
    """The `parallelize` seam: DDP-wrap or FSDP2-shard a built fp32 model (after activation checkpointing /
    compile, before the optimizer). Identity without an initialised process group of more than 1 rank."""
    if dist_cfg.mode == "none" or not (tdist.is_initialized() and tdist.get_world_size() > 1):
        return model
    device = device or next(model.parameters()).device
    if dist_cfg.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if dist_cfg.mode == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (tdist.get_world_size(),))
        # One FSDP unit per block (its parameters are all-gathered just before its forward / backward and
        # freed after), then the root for the embeddings and final layer (the torchtitan recipe).
        for block in transformer_blocks(model):
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    raise ConfigError(f"distributed.mode={dist_cfg.mode!r}; choose ddp or fsdp2")


# ---- state dicts ------------------------------------------------------------------------------------------


def _param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Fully qualified names of the optimizer's parameters in its own order (the index torch.optim uses)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]


class FSDP2StateIO(PlainStateIO):
    """Full CPU state dicts of an FSDP2 model / optimizer; collectives: every rank must call them. Gathered
    tensors land on rank 0 only (cpu_offload); the other ranks get empty dicts (only rank 0 writes)."""

    @staticmethod
    def _options(**kw):
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(full_state_dict=True, **kw)

    def model_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(model, options=self._options(cpu_offload=True))

    def load_model_state(self, model: nn.Module, sd: dict[str, torch.Tensor]) -> None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(model, sd, options=self._options(strict=True))

    def optim_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        """The full optimizer state in torch.optim's layout (state and param_groups keyed by parameter
        index), so that a 1-process run resumes from it with Optimizer.load_state_dict."""
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        osd = get_optimizer_state_dict(model, optimizer, options=self._options(cpu_offload=True))
        if not osd:
            return {}
        index = {n: i for i, n in enumerate(_param_names(model, optimizer))}
        groups = [{**g, "params": [index[n] for n in g["params"]]} for g in osd["param_groups"]]
        return {"state": {index[n]: st for n, st in osd["state"].items()}, "param_groups": groups}

    def load_optim_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, sd: dict) -> None:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        names = _param_names(model, optimizer)

        def fqn(k):
            return names[int(k)] if isinstance(k, int) or str(k).isdigit() else k

        osd = {"state": {fqn(k): st for k, st in sd["state"].items()},
               "param_groups": [{**g, "params": [fqn(k) for k in g["params"]]} for g in sd["param_groups"]]}
        set_optimizer_state_dict(model, optimizer, osd, options=self._options())

    @torch.no_grad()
    def load_ema(self, ema: dict[str, torch.Tensor], full: dict[str, torch.Tensor]) -> None:
        """ema[k] (a sharded DTensor) <- the full CPU tensor full[k]; each rank keeps its own shard."""
        # copy_ from a plain tensor into a DTensor is refused unless the plain tensor is treated as
        # replicated; implicit_replication does exactly that, entered for this copy only
        from torch.distributed.tensor.experimental import implicit_replication

        with implicit_replication():
            for k, v in ema.items():
                v.copy_(full[k].to(v.device))


# ---- the seam ---------------------------------------------------------------------------------------------


def trainer_kwargs(cfg: RunConfig) -> dict[str, Any]:
    """{"dist", "parallelize", "state_io"} for Trainer(cfg, **kwargs); see the module docstring."""
    ctx = init_distributed(cfg)
    if ctx.world_size == 1 or cfg.distributed.mode == "none":
        return {"dist": ctx, "parallelize": None, "state_io": PlainStateIO()}
    return {"dist": ctx, "parallelize": functools.partial(parallelize, device=ctx.device),
            "state_io": FSDP2StateIO() if cfg.distributed.mode == "fsdp2" else PlainStateIO()}
