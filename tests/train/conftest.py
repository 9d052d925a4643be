"""A tiny synthetic latent cache for trainer tests, built with the real `build_cache`.

The encoders are small deterministic functions (not random networks), so the cache (and the golden loss
curve trained on it) does not change when the project's autoencoder or text encoders change:
  - autoencoder: 8x8 average pooling, then a fixed 1x1 projection 3 -> 16 channels (16-channel latents,
    8x down, like FLUX's);
  - text encoder: each word maps to a fixed pseudo-random 384-d vector (seeded by its crc32), 8 tokens,
    pooled vector = mean of the word vectors; "" gives zeros (the cached unconditional embedding).
Images: 32x32 colour fields with a square of another colour in one quadrant, two caption fields.
"""

from __future__ import annotations

import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from rectiflow.data.cache_writer import build_cache
from rectiflow.data.sources import ArraySource

ROOT = Path(__file__).resolve().parents[2]
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 220), "yellow": (230, 220, 40),
           "white": (240, 240, 240), "black": (15, 15, 15)}
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")
N_SAMPLES = 24
SIZE = 32


@dataclass(frozen=True)
class PoolParams:
    channels: int = 16
    factor: int = 8


class PoolAutoEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.params = PoolParams()
        g = torch.Generator().manual_seed(0)
        self.proj = nn.Parameter(torch.randn(16, 3, generator=g) * 0.8, requires_grad=False)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        z = nn.functional.avg_pool2d(x, 8)  # [B, 3, H/8, W/8]
        return torch.einsum("oc,bchw->bohw", self.proj, z)  # [B, 16, H/8, W/8]


class HashTextEncoder:
    txt_dim = vec_dim = 384
    max_length = 8

    def _word(self, w: str) -> torch.Tensor:
        return torch.randn(384, generator=torch.Generator().manual_seed(zlib.crc32(w.encode())))

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        txt = torch.zeros(len(prompts), self.max_length, 384)
        for i, p in enumerate(prompts):
            for j, w in enumerate(p.split()[: self.max_length]):
                txt[i, j] = self._word(w)
        n = torch.tensor([max(1, min(len(p.split()), self.max_length)) for p in prompts])
        return txt, txt.sum(1) / n[:, None]

    def spec(self) -> dict:
        return {"kind": "test-hash", "dim": 384, "max_length": self.max_length}

    def fingerprint(self) -> str:
        return "test-hash-v1"


def _item(i: int):
    rng = np.random.default_rng([7, i])
    names = list(COLOURS)
    bg, fg = rng.choice(len(names), 2, replace=False)
    q = int(rng.integers(4))
    img = np.empty((SIZE, SIZE, 3), np.uint8)
    img[:] = COLOURS[names[bg]]
    r0, c0 = (q // 2) * 16, (q % 2) * 16
    img[r0:r0 + 16, c0:c0 + 16] = COLOURS[names[fg]]
    caps = {"original": [f"a {names[fg]} square"],
            "synthetic": [f"a {names[fg]} square in the {QUADRANTS[q]} on {names[bg]}"]}
    return img, caps, f"sample-{i:03d}"


def make_cache(out: Path) -> Path:
    src = ArraySource(N_SAMPLES, _item, name="squares")
    return build_cache(src, PoolAutoEncoder(), HashTextEncoder(), out, size=SIZE, batch_size=8, shard_size=16)


def random_bundle_cache(root: Path, n: int) -> tuple[Path, Path]:
    """For tests that export and sample: a random bundle's tiny autoencoder (under root/random) and an
    n-sample cache of the squares made with it and MiniLM (root/cache). Returns (autoencoder file, cache)."""
    from rectiflow.convert.autoencoder import load_autoencoder
    from rectiflow.models.text import load_text_encoder
    from rectiflow.sample.random_model import random_bundle

    ae_file = random_bundle(root / "random") / "ae.safetensors"
    encoder = load_text_encoder("minilm", device="cpu", dtype=torch.float32)
    cache = build_cache(ArraySource(n, _item, name="squares"), load_autoencoder(ae_file), encoder,
                        root / "cache", size=SIZE, batch_size=8, shard_size=16)
    return ae_file, cache


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory) -> Path:
    return make_cache(tmp_path_factory.mktemp("cache") / "squares")


@pytest.fixture
def train_env():
    import os

    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + str(ROOT / "tests" / "train") + os.pathsep + \
        env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


PYTHON = sys.executable


# Overrides every test run uses on top of configs/tiny.toml: the 24-sample cache, no validation, fast logs.
TEST_OVERRIDES = [
    "data.batch_size=4", "validation.every=0", "validation.holdout=0", "optim.warmup_steps=5",
    "optim.lr=1e-3", "ema.start=0", "ema.decay=0.9", "train.log_every=1", "train.progress=false",
    "logging.tensorboard=false", "checkpoint.keep=0", 'export.formats=["rectiflow"]',
]
TINY_TOML = ROOT / "configs" / "tiny.toml"
RESUME_ARGS = ("model.preset=micro", "train.steps=20", "checkpoint.every=5")


def overrides(cache: Path, out: Path, *extra: str) -> list[str]:
    return [*TEST_OVERRIDES, f'data.cache="{cache}"', f'train.out_dir="{out}"', *extra]


def cli_train(args: list[str], env: dict, **kw):
    import subprocess

    return subprocess.run([PYTHON, "-m", "rectiflow", "train", str(TINY_TOML), *args], env=env,
                          capture_output=True, text=True, timeout=240, **kw)


@pytest.fixture(scope="session")
def reference_run(tiny_cache, tmp_path_factory):
    """An uninterrupted 20-step run (subprocess, 1 thread), checkpoints every 5 steps. The `micro` model
    (0.2M parameters) keeps the many full-state checkpoint writes cheap; exactness does not depend on size."""
    import os

    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    out = tmp_path_factory.mktemp("reference") / "run"
    r = cli_train(overrides(tiny_cache, out, *RESUME_ARGS), env)
    assert r.returncode == 0, r.stderr[-2000:]
    return out


def assert_same_checkpoint(a: Path, b: Path) -> None:
    """Model, EMA, optimizer tensors and the RNG state identical (torch.equal)."""
    from safetensors.torch import load_file

    for f in ("model.safetensors", "ema.safetensors", "optimizer.safetensors", "rng.safetensors"):
        ta, tb = load_file(str(a / f)), load_file(str(b / f))
        assert ta.keys() == tb.keys(), f
        bad = [k for k in ta if not torch.equal(ta[k], tb[k])]
        assert not bad, f"{f}: {len(bad)} tensors differ, e.g. {bad[:3]}"
