"""Resume is exact: N steps, SIGKILL, resume, M more steps == N + M steps in one run (CPU, torch.equal);
an interrupted checkpoint write leaves the previous checkpoint intact and resume uses it."""

import os
import signal
import subprocess
import time

from conftest import PYTHON, RESUME_ARGS, TINY_TOML, assert_same_checkpoint, cli_train, overrides
from rectiflow.train.checkpoint import FAULT_ENV, find_latest, list_checkpoints
from rectiflow.train.metrics import read_metrics


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(TINY_TOML.parents[1] / "src") + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"  # same as the reference run
    return env


def _losses(run):
    return {r["step"]: r["loss"] for r in read_metrics(run / "logs" / "metrics.jsonl", "train")}


def test_sigkill_then_resume_equals_uninterrupted(tiny_cache, reference_run, tmp_path):
    out = tmp_path / "run"
    args = overrides(tiny_cache, out, *RESUME_ARGS)
    proc = subprocess.Popen([PYTHON, "-m", "rectiflow", "train", str(TINY_TOML), *args], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first = out / "checkpoints" / "step-000000005" / "state.json"
    deadline = time.time() + 180
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    killed_at = find_latest(out / "checkpoints")
    assert killed_at is not None and killed_at.name != "step-000000020"
    r = cli_train([*args, "--resume"], _env())
    assert r.returncode == 0, r.stderr[-2000:]
    final = "step-000000020"
    assert_same_checkpoint(out / "checkpoints" / final, reference_run / "checkpoints" / final)
    ref, got = _losses(reference_run), _losses(out)
    assert all(got[s] == ref[s] for s in range(int(killed_at.name[5:]) + 1, 21))


def test_crash_inside_checkpoint_write_keeps_previous(tiny_cache, reference_run, tmp_path):
    out = tmp_path / "run"
    args = overrides(tiny_cache, out, *RESUME_ARGS)
    r = cli_train(args, {**_env(), FAULT_ENV: "exit-midway:10"})
    assert r.returncode == 17, r.stderr[-2000:]
    ckpts = out / "checkpoints"
    partial = list(ckpts.glob(".step-000000010.tmp-*"))
    assert partial and (partial[0] / "model.safetensors").is_file()  # died in the middle of the write
    assert [p.name for p in list_checkpoints(ckpts)] == ["step-000000005"]
    assert_same_checkpoint(ckpts / "step-000000005", reference_run / "checkpoints" / "step-000000005")
    r = cli_train([*args, "--resume"], _env())
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed from" in r.stderr and "step-000000005" in r.stderr
    assert_same_checkpoint(ckpts / "step-000000020", reference_run / "checkpoints" / "step-000000020")
    assert not list(ckpts.glob(".step-*"))  # stale temporary directories are cleaned up


def test_ctrl_c_writes_checkpoint_and_resume_is_exact(tiny_cache, reference_run, tmp_path):
    out = tmp_path / "run"
    args = overrides(tiny_cache, out, *RESUME_ARGS)
    proc = subprocess.Popen([PYTHON, "-m", "rectiflow", "train", str(TINY_TOML), *args], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = out / "checkpoints" / "step-000000005" / "state.json"
    deadline = time.time() + 180
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    assert "interrupted at step" in stdout
    step = int(stdout.split("interrupted at step ")[1].split(";")[0])
    assert 5 <= step < 20 and find_latest(out / "checkpoints").name == f"step-{step:09d}"
    r = cli_train([*args, "--resume"], _env())
    assert r.returncode == 0, r.stderr[-2000:]
    final = "step-000000020"
    assert_same_checkpoint(out / "checkpoints" / final, reference_run / "checkpoints" / final)
