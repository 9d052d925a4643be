"""Distributed training on CPU (gloo, 2 processes started with torchrun through `rectiflow train`):
DDP reproduces a 1-process run with the same global batch (per-step loss within 1e-6 relative, final
weights close); FSDP2 trains, checkpoints and resumes exactly, and its checkpoint loads (and resumes) in a
single process. The `micro` preset (0.2M parameters) keeps each launch to a few seconds."""

import os
import shutil
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from conftest import PYTHON, ROOT, TINY_TOML, assert_same_checkpoint, overrides
from rectiflow.errors import ConfigError
from rectiflow.train import distributed
from rectiflow.train.config import DistributedConfig, load_config
from rectiflow.train.distributed import LocalContext, PlainStateIO
from rectiflow.train.metrics import read_metrics
from rectiflow.train.run import run_training

# 7 steps with checkpoints at 3 and 6, then the final one at 7; EMA copies the weights for the first 2 steps
# (the warm-up path has to work on FSDP2's DTensors too), then averages.
ARGS = ("model.preset=micro", "train.steps=7", "checkpoint.every=3", "ema.start=2")
FINAL = "step-000000007"


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def torchrun(args: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    cmd = [PYTHON, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "rectiflow", "train", str(TINY_TOML), *args]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240)


def _losses(run) -> dict[int, float]:
    rows = read_metrics(run / "logs" / "metrics.jsonl", "train")
    steps = [r["step"] for r in rows]
    assert steps == sorted(set(steps)), f"one row per step (rank 0 only), got steps {steps}"
    return {r["step"]: r["loss"] for r in rows}


def _assert_losses_close(got: dict[int, float], want: dict[int, float], rtol: float) -> None:
    assert list(got) == list(want) == list(range(1, 8))
    rel = [abs(got[s] - want[s]) / abs(want[s]) for s in want]
    assert max(rel) <= rtol, f"per-step relative loss differences {rel}"


def _assert_weights_close(a, b, atol: float) -> None:
    for f in ("model.safetensors", "ema.safetensors"):
        ta, tb = load_file(str(a / f)), load_file(str(b / f))
        assert ta.keys() == tb.keys(), f
        worst = max(float((ta[k] - tb[k]).abs().max()) for k in ta)
        assert worst <= atol, f"{f}: max abs difference {worst}"


def _one_process(tiny_cache, out, args, resume=None):
    """A run in this process with 1 thread, like each torchrun child."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_training(load_config(TINY_TOML, overrides(tiny_cache, out, *args)), resume=resume)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def single_run(tiny_cache, tmp_path_factory):
    """The 1-process reference."""
    out = tmp_path_factory.mktemp("single") / "run"
    _one_process(tiny_cache, out, ARGS)
    return out


@pytest.fixture(scope="module")
def fsdp2_run(tiny_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp2") / "run"
    r = torchrun(overrides(tiny_cache, out, *ARGS, "distributed.mode=fsdp2"))
    assert r.returncode == 0, r.stderr[-3000:]
    return out


# ---- single process: everything is a no-op ---------------------------------------------------------------


def test_single_process_is_a_noop(tiny_cache, tmp_path, monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    cfg = load_config(TINY_TOML, overrides(tiny_cache, tmp_path, "distributed.mode=fsdp2"))
    kw = distributed.trainer_kwargs(cfg)
    assert isinstance(kw["dist"], LocalContext) and kw["dist"].world_size == 1
    assert kw["parallelize"] is None and type(kw["state_io"]) is PlainStateIO
    model = torch.nn.Linear(2, 2)
    assert distributed.parallelize(model, DistributedConfig(mode="ddp")) is model  # no process group


def test_launch_env_is_read_and_checked():
    assert distributed.launch_env({}) == (0, 1, 0)
    assert distributed.launch_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == (3, 4, 1)
    with pytest.raises(ConfigError, match="RANK=4, WORLD_SIZE=4"):
        distributed.launch_env({"RANK": "4", "WORLD_SIZE": "4"})
    with pytest.raises(ConfigError, match="not an integer"):
        distributed.launch_env({"WORLD_SIZE": "two"})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without a GPU")
def test_cuda_without_gpu_is_a_config_error(tiny_cache, tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    cfg = load_config(TINY_TOML, overrides(tiny_cache, tmp_path, "distributed.mode=ddp", "train.device=cuda"))
    with pytest.raises(ConfigError, match="needs GPU 0 but 0 are visible"):
        distributed.trainer_kwargs(cfg)


# ---- DDP ---------------------------------------------------------------------------------------------------


def test_ddp_two_processes_match_one(tiny_cache, single_run, tmp_path):
    out = tmp_path / "ddp"
    r = torchrun(overrides(tiny_cache, out, *ARGS, "distributed.mode=ddp"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "distributed ddp: 2 processes, backend gloo" in r.stderr
    _assert_losses_close(_losses(out), _losses(single_run), rtol=1e-6)
    _assert_weights_close(out / "checkpoints" / FINAL, single_run / "checkpoints" / FINAL, atol=1e-5)
    assert (out / "export" / "transformer.safetensors").is_file()


# ---- FSDP2 -------------------------------------------------------------------------------------------------


def test_fsdp2_trains_like_one_process(fsdp2_run, single_run):
    # Sharded gradient norms (for clipping) and reduce-scatters sum in another order: 1e-5, not bitwise.
    _assert_losses_close(_losses(fsdp2_run), _losses(single_run), rtol=1e-5)
    _assert_weights_close(fsdp2_run / "checkpoints" / FINAL, single_run / "checkpoints" / FINAL, atol=1e-5)
    # Same single-file layout as a 1-process checkpoint: full tensors, optimizer state keyed by index.
    for f in ("model.safetensors", "ema.safetensors", "optimizer.safetensors"):
        got = load_file(str(fsdp2_run / "checkpoints" / FINAL / f))
        want = load_file(str(single_run / "checkpoints" / FINAL / f))
        assert got.keys() == want.keys(), f
        assert all(got[k].shape == want[k].shape for k in got), f


def test_fsdp2_resume_equals_uninterrupted(tiny_cache, fsdp2_run, tmp_path):
    out = tmp_path / "resumed"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(fsdp2_run / "checkpoints" / "step-000000003", out / "checkpoints" / "step-000000003")
    r = torchrun([*overrides(tiny_cache, out, *ARGS, "distributed.mode=fsdp2"), "--resume"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stderr and "step-000000003" in r.stderr
    assert_same_checkpoint(out / "checkpoints" / FINAL, fsdp2_run / "checkpoints" / FINAL)
    got, want = _losses(out), _losses(fsdp2_run)
    assert list(got) == [4, 5, 6, 7] and all(got[s] == want[s] for s in got)  # logged after the resume


def test_fsdp2_checkpoint_loads_and_resumes_in_one_process(tiny_cache, fsdp2_run, single_run, tmp_path):
    from rectiflow.convert.transformer import load_transformer

    ckpt = fsdp2_run / "checkpoints" / FINAL
    model = load_transformer(ckpt / "model.safetensors", device="cpu", dtype=torch.float32)
    sd = load_file(str(ckpt / "model.safetensors"))
    assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())
    # A 1-process run resumes from the FSDP2 step-6 checkpoint (model, EMA, AdamW state) and takes the
    # last step like the 1-process reference.
    out = tmp_path / "one"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(fsdp2_run / "checkpoints" / "step-000000006", out / "checkpoints" / "step-000000006")
    result = _one_process(tiny_cache, out, ARGS, resume="latest")
    assert result["step"] == 7
    _assert_weights_close(out / "checkpoints" / FINAL, single_run / "checkpoints" / FINAL, atol=1e-5)
    got = load_file(str(out / "checkpoints" / FINAL / "optimizer.safetensors"))
    want = load_file(str(single_run / "checkpoints" / FINAL / "optimizer.safetensors"))
    assert all(torch.allclose(got[k], want[k], rtol=1e-4, atol=1e-8) for k in want)



# ---- few-step distillation under DDP / FSDP2 ---------------------------------------------------------------


@pytest.fixture(scope="module")
def distill_args(tmp_path_factory):
    """ARGS plus a [distill] section: a micro teacher (random, larger output weights so CFG matters) that is
    also the student's init. Every rank loads the (unsharded, frozen) teacher."""
    from rectiflow.convert.transformer import build_transformer, save_transformer

    torch.manual_seed(3)
    teacher = build_transformer("micro")
    with torch.no_grad():
        for p in teacher.final_layer.parameters():
            p.normal_(0, 0.2)
    path = save_transformer(teacher, tmp_path_factory.mktemp("teacher") / "teacher.safetensors")
    return (*ARGS, f'model.init="{path}"', f'distill.teacher="{path}"', "distill.student_steps=2",
            "distill.teacher_cfg=2.0")


@pytest.fixture(scope="module")
def single_distill_run(tiny_cache, tmp_path_factory, distill_args):
    out = tmp_path_factory.mktemp("single-distill") / "run"
    _one_process(tiny_cache, out, distill_args)
    return out


@pytest.mark.parametrize("mode,rtol", [("ddp", 1e-6), ("fsdp2", 1e-5)])
def test_distillation_on_two_processes_matches_one(tiny_cache, single_distill_run, distill_args, tmp_path,
                                                    mode, rtol):
    out = tmp_path / mode
    r = torchrun(overrides(tiny_cache, out, *distill_args, f"distributed.mode={mode}"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "distilling" in r.stderr
    _assert_losses_close(_losses(out), _losses(single_distill_run), rtol=rtol)
    _assert_weights_close(out / "checkpoints" / FINAL, single_distill_run / "checkpoints" / FINAL, atol=1e-5)
