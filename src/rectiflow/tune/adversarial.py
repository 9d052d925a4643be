"""DMD2's GAN term (Yin et al. 2024, "Improved Distribution Matching Distillation", arXiv:2405.14867,
sec. 4.3): a classifier on the fake model's features tells noised real latents from noised generator
samples, and the generator is trained to be classified as real.

Why: distribution matching only moves the generator toward the teacher's distribution, so it inherits the
teacher's errors. Real data is the one signal that does not: on the shapes world a one-step DMD generator
draws a shape in two palette colours at once, which no real image does (docs/reflow.md).

The classifier reads the fake model's last image-token states (the input of its final layer, for FLUX and
SD3 alike), computed at a noised copy x_t of each sample as the fake model's own loss computes them, so the
fake model and the classifier train together on one optimiser, as in DMD2 (where the classifier sits on the
fake UNet's bottleneck). It gives one logit per image, as DMD2's does (their convolutions reduce the
bottleneck to 1x1): the tokens are transformed one by one, then pooled (mean and max, so that one wrong
token can decide), so that it judges the picture as a whole, a shape drawn in two colours included. The
losses are the non-saturating GAN losses (softplus). DMD2's weights for SDXL: 5e-3 on the generator's
GAN loss, 1e-2 on the classifier's (their gen_cls_loss_weight and guidance_cls_loss_weight)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rectiflow.data.cache_reader import LatentCache
from rectiflow.errors import ConfigError

GAN_WEIGHT = 5e-3  # DMD2 SDXL: gen_cls_loss_weight
CLASSIFIER_WEIGHT = 1e-2  # DMD2 SDXL: guidance_cls_loss_weight

__all__ = ["CLASSIFIER_WEIGHT", "GAN_WEIGHT", "RealLatents", "RealnessClassifier", "classifier_loss",
           "generator_gan_loss", "last_hidden_states"]


class RealnessClassifier(nn.Module):
    """The logit that an image's tokens come from a real latent: [B, L, hidden] -> [B]."""

    def __init__(self, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.per_token = nn.Linear(hidden, hidden)
        self.pooled_norm = nn.LayerNorm(2 * hidden)
        self.out = nn.Linear(2 * hidden, 1)
        nn.init.zeros_(self.out.weight)  # starts undecided (every logit 0), so the first updates are gentle
        nn.init.zeros_(self.out.bias)

    def forward(self, h: Tensor) -> Tensor:
        x = F.silu(self.per_token(self.norm(h.float())))  # [B, L, hidden]
        pooled = torch.cat((x.mean(dim=1), x.amax(dim=1)), dim=-1)  # [B, 2 hidden]
        return self.out(self.pooled_norm(pooled)).squeeze(-1)


@contextmanager
def last_hidden_states(transformer: nn.Module) -> Iterator[list[Tensor]]:
    """Inside the block, every forward of `transformer` appends its last image-token states [B, L, hidden]
    (the input of its final layer) to the yielded list, with their graph."""
    final = getattr(transformer, "final_layer", None)
    if final is None:
        raise ConfigError(f"the GAN term reads a transformer's final_layer input; "
                          f"{type(transformer).__name__} has no final_layer")
    seen: list[Tensor] = []
    handle = final.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    try:
        yield seen
    finally:
        handle.remove()


def classifier_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """The classifier's non-saturating loss: softplus(-real) + softplus(fake), each a mean over images."""
    return F.softplus(-real_logits.float()).mean() + F.softplus(fake_logits.float()).mean()


def generator_gan_loss(fake_logits: Tensor) -> Tensor:
    """The generator's non-saturating loss: softplus(-logit) of its samples, a mean over images."""
    return F.softplus(-fake_logits.float()).mean()


class RealLatents:
    """Random batches of real latents with their captions' text embeddings from a `rectiflow cache` made by
    the teacher's autoencoder and text encoder (the fake model, a copy of the teacher, reads them)."""

    def __init__(self, path, autoencoder, text_encoder, shape: tuple[int, ...]):
        self.cache = LatentCache(path)
        self.path = self.cache.path
        self.cache.require_compatible(autoencoder, text_encoder)
        sizes = {tuple(s["size"]) for s in self.cache.manifest["shards"]}
        if len(sizes) > 1:
            raise ConfigError(f"the real latents in {self.path} come in {len(sizes)} image sizes; cache one "
                              "size, the model's default")
        found = tuple(self.cache.latents(0).shape)
        if found != tuple(shape):
            raise ConfigError(f"the real latents in {self.path} are {found}; the model samples "
                              f"{tuple(shape)} at its default size: cache images of that size")

    def __len__(self) -> int:
        return len(self.cache)

    def draw(self, n: int, gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        """(latents [n, C, h, w], txt [n, L, D], vec [n, Dv]) of n rows drawn with replacement."""
        idx = torch.randint(len(self.cache), (n,), generator=gen).tolist()
        b = self.cache.get_batch(idx)
        return b["latents"].float(), b["txt"], b["vec"]
