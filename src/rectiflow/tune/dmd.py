"""Distribution matching distillation: train a few-step generator whose samples match a teacher's
distribution (rectiflow.flow.distribution_matching has the math and its sources).

Three networks: the generator (the model being tuned, sampled with its own N-step Euler grid), the teacher
(frozen; its CFG-guided velocity is the "real" score) and the fake model (initialised from the teacher and
trained online, by the ordinary flow-matching loss, on the generator's samples: the generator's own score).
One iteration is DMD2's two-time-scale rule: `fake_updates` updates of the fake model, each on a fresh batch
of generator samples, then one generator update on DMD's gradient at a noised copy of a fresh batch.

With real latents (`real`, a `rectiflow cache`) and a GAN weight, DMD2's GAN term is added
(rectiflow.tune.adversarial): a classifier on the fake model's last image-token states, trained with it, tells
noised real latents from noised generator samples, and the generator learns to pass as real.

A multi-step generator (steps > 1) is trained as DMD2 trains theirs (backward simulation): each batch picks
one of its steps, runs the generator's own sampler up to it without a graph, and trains the denoised estimate
it makes there, x0^ = x - t v, toward the teacher's distribution; the last step's x0^ is the image itself.

Prompts come from a PromptPool (text only: no images are needed). The generator and the teacher may have
different text encoders (each encodes the prompts itself), but not different latent spaces. The run resumes
from OUT/state.pt (generator, fake model, both optimizers, iteration, history; every batch is seeded by
(seed, iteration), so a resumed run is the uninterrupted one) and exports OUT/bundle, whose default sampler is
the generator's (its steps and shift, CFG 1: guidance is distilled into it).

Why here (above train and sample): the loop samples with two bundles' pipelines and trains; like
rectiflow.tune.grpo it fine-tunes a finished model on its own samples."""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from rectiflow.convert.bundle import save_bundle
from rectiflow.errors import ConfigError, RectiflowError
from rectiflow.flow import RectifiedFlow, cfg_combine, timestep_grid
from rectiflow.flow.distribution_matching import FAKE_UPDATES, T_RANGE, denoised, distribution_matching_loss
from rectiflow.sample.pipeline import Pipeline, initial_noise
from rectiflow.tune.adversarial import (
    CLASSIFIER_WEIGHT,
    GAN_WEIGHT,
    RealLatents,
    RealnessClassifier,
    classifier_loss,
    generator_gan_loss,
    last_hidden_states,
)
from rectiflow.tune.prompts import PromptEmbeddings, PromptPool
from rectiflow.tune.run_state import load_run_state, save_run_state

__all__ = ["DMDOptions", "dmd"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DMDOptions:
    """iterations: generator updates; batch: samples per update (of either network); steps / shift: the
    generator's sampler (None / "default": the model's); teacher_cfg: the CFG scale of the teacher's
    velocity, the distribution the generator learns to draw in one forward per step; lr / fake_lr: AdamW
    learning rates of the generator and the fake model (fake_lr None: lr); fake_updates: fake-model updates
    per generator update (DMD2's 5); t_range: the flow times at which the distributions are compared;
    regression: the weight of DMD's regression loss (DMD1; 0: off, DMD2's choice), the mean squared latent
    distance of the generator's first-step estimate from a coupling's noise to the teacher's ODE endpoint of
    that noise (couplings from `rectiflow reflow pairs`); gan / gan_classifier: the weights of DMD2's GAN
    losses of the generator and of the classifier (0: off; needs real latents); classifier_lr: the
    classifier's learning rate (None: fake_lr), on the fake model's optimiser; gan_t_max: the classifier sees
    samples noised to times in [t_range's low end, gan_t_max] (None: t_range's, as DMD2)."""

    iterations: int = 1000
    batch: int = 32
    steps: int | None = None
    shift: Any = "default"
    teacher_cfg: float = 3.0  # the students' teacher_cfg elsewhere (docs/studies.md: CFG 3 is the best scale)
    lr: float = 5e-5  # docs/reflow.md, runs A-F: 2e-5 to 1.5e-4 land alike; 5e-5 / 1e-4 are runs B and C
    fake_lr: float | None = 1e-4
    fake_updates: int = FAKE_UPDATES
    t_range: tuple[float, float] = T_RANGE
    regression: float = 0.0
    gan: float = 0.0
    gan_classifier: float = CLASSIFIER_WEIGHT
    classifier_lr: float | None = None
    gan_t_max: float | None = None
    max_grad_norm: float = 1.0
    checkpoint_every: int = 50
    seed: int = 0

    def __post_init__(self) -> None:
        ints = {"iterations": 1, "batch": 1, "fake_updates": 1, "checkpoint_every": 1}
        for name, low in ints.items():
            v = getattr(self, name)
            if not isinstance(v, int) or v < low:
                raise ConfigError(f"{name} must be an integer >= {low}, got {v!r}")
        if self.steps is not None and (not isinstance(self.steps, int) or self.steps < 1):
            raise ConfigError(f"steps must be an integer >= 1, got {self.steps!r}")
        if self.fake_lr is None:  # frozen: resolve the defaults once
            object.__setattr__(self, "fake_lr", self.lr)
        if self.classifier_lr is None:
            object.__setattr__(self, "classifier_lr", self.fake_lr)
        for name in ("lr", "fake_lr", "classifier_lr", "teacher_cfg", "max_grad_norm"):
            if not float(getattr(self, name)) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("regression", "gan", "gan_classifier"):
            if not float(getattr(self, name)) >= 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        lo, hi = (float(v) for v in self.t_range)
        if not 0.0 < lo < hi < 1.0:
            raise ConfigError(f"t_range must satisfy 0 < LO < HI < 1 (flow time), got {lo:g},{hi:g}")
        object.__setattr__(self, "t_range", (lo, hi))
        gan_hi = hi if self.gan_t_max is None else float(self.gan_t_max)
        if not lo < gan_hi < 1.0:
            raise ConfigError(f"gan_t_max must lie in ({lo:g}, 1), from the low end of t_range to 1; got "
                              f"{gan_hi:g}")
        object.__setattr__(self, "gan_t_max", gan_hi)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class _Net:
    """One bundle's velocity in latent space [B, C, h, w], with a swappable transformer (the fake model
    runs on the teacher's pipeline) and cached prompt embeddings."""

    def __init__(self, pipe: Pipeline, lh: int, lw: int):
        self.pipe, self.lh, self.lw = pipe, lh, lw
        self.embed = PromptEmbeddings(pipe)

    def velocity(self, transformer, prompts, z: torch.Tensor, t: torch.Tensor,
                 cfg: float = 1.0) -> torch.Tensor:
        """v(z, t) [B, C, h, w] for latents z and flow times t (0-d or [B]); prompts: a list of strings, or
        their embeddings (txt, vec) from a cache of this pipeline's text encoder; cfg != 1 (prompts as
        strings): CFG against the empty prompt, as two plain batches so that per-sample times stay aligned."""
        pipe = self.pipe
        if transformer is not pipe.transformer:
            pipe = copy.copy(pipe)
            pipe.transformer = transformer
        fam, g = pipe.family, pipe.defaults.guidance
        x = fam.pack(z.to(pipe.device, pipe.dtype))
        t = t.to(pipe.device, torch.float32)
        cond = prompts if isinstance(prompts, tuple) else self.embed(prompts)
        v = pipe.velocity_fn(cond, None, self.lh, self.lw, g)(x, t)
        if cfg != 1.0:
            v_u = pipe.velocity_fn(self.embed([""] * len(prompts)), None, self.lh, self.lw, g)(x, t)
            v = cfg_combine(v, v_u, cfg)
        return fam.unpack(v, self.lh, self.lw)


def _check_pair(pipe: Pipeline, teacher: Pipeline) -> None:
    if pipe.transformer is teacher.transformer:
        raise ConfigError("the model and the teacher are one network; load the teacher separately (it stays "
                          "frozen while the model trains)")
    for who, p in (("model", pipe), ("teacher", teacher)):
        if not isinstance(p.flow_path, RectifiedFlow):
            raise ConfigError(f"DMD here needs rectified-flow models; the {who} {p.name!r} is trained on "
                              f"{type(p.flow_path).__name__}")
    a, b = pipe.autoencoder.state_dict(), teacher.autoencoder.state_dict()
    same = a.keys() == b.keys() and all(a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a)
    if not same or pipe.downsample != teacher.downsample:
        raise ConfigError(f"the teacher {teacher.name!r} has another autoencoder than the model "
                          f"{pipe.name!r}: their latents are not one space; distil from a teacher of "
                          "the same autoencoder")


class _Run:
    """The three networks and the generator's sampler."""

    def __init__(self, pipe: Pipeline, teacher: Pipeline, opt: DMDOptions, couplings=None, real=None):
        _check_pair(pipe, teacher)
        d = pipe.defaults
        self.opt, self.device = opt, pipe.device
        self.steps = d.steps if opt.steps is None else opt.steps
        self.shift = d.shift if opt.shift == "default" else opt.shift
        lh, lw = d.height // pipe.downsample, d.width // pipe.downsample
        self.shape = (pipe.autoencoder.params.z_channels, lh, lw)
        self.ts = [float(t) for t in timestep_grid(self.steps, shift=self.shift,
                                                   seq_len=pipe.image_tokens(lh, lw))]
        self.gen, self.real = _Net(pipe, lh, lw), _Net(teacher, lh, lw)
        self.generator = pipe.transformer
        self.fake = copy.deepcopy(teacher.transformer)
        teacher.transformer.requires_grad_(False).train(False)
        self.couplings = couplings
        if opt.regression > 0 and couplings is None:
            raise ConfigError("the regression loss needs couplings (--couplings DIR from `rectiflow reflow "
                              "pairs` with the teacher); give them or set --regression 0")
        if couplings is not None:
            couplings.require_compatible(pipe.autoencoder)
            if tuple(couplings.z0.shape[1:]) != self.shape:
                raise ConfigError(f"the couplings' latents are {tuple(couplings.z0.shape[1:])}, the model "
                                  f"samples {self.shape} at its {d.width}x{d.height} default size")
        self.real_latents, self.classifier = None, None
        if opt.gan > 0 and real is None:
            raise ConfigError("the GAN term needs real latents (--real CACHE, a `rectiflow cache` of the "
                              "teacher's encoders); give them or set --gan 0")
        if opt.gan == 0 and real is not None:
            raise ConfigError(f"real latents (--real) are read only by the GAN term; give --gan W > 0 (DMD2: "
                              f"{GAN_WEIGHT:g}) or leave --real out")
        if real is not None:
            self.real_latents = RealLatents(real, teacher.autoencoder, teacher.text_encoder, self.shape)
            with torch.random.fork_rng(devices=[]):  # its initial weights a function of the options alone
                torch.manual_seed(opt.seed)
                self.classifier = RealnessClassifier(self.fake.params.hidden_size).to(pipe.device)

    def fake_parameters(self) -> list[torch.nn.Parameter]:
        """What the fake model's optimiser trains: the fake model, and the GAN's classifier with it."""
        return [p for g in self.fake_parameter_groups() for p in g["params"]]

    def fake_parameter_groups(self) -> list[dict[str, Any]]:
        groups = [{"params": list(self.fake.parameters())}]
        if self.classifier is not None:
            groups.append({"params": list(self.classifier.parameters()), "lr": self.opt.classifier_lr})
        return groups

    def sample(self, prompts: list[str], gen: torch.Generator, grad: bool) -> torch.Tensor:
        """The generator's denoised estimate x0^ [B, C, h, w] at one of its steps (drawn from gen; the last
        step's x0^ is its image), the steps before it run without a graph (DMD2's backward simulation)."""
        k = int(torch.randint(self.steps, (1,), generator=gen))
        z = initial_noise(None, len(prompts), *self.shape, generator=gen).to(self.device)
        with torch.no_grad():
            for j in range(k):
                t, tn = self.ts[j], self.ts[j + 1]
                z = z + (tn - t) * self.gen.velocity(self.generator, prompts, z, torch.tensor(t))
        with torch.set_grad_enabled(grad):
            t = torch.tensor(self.ts[k])
            return denoised(z, self.gen.velocity(self.generator, prompts, z, t), t)

    def noised(self, x0: torch.Tensor, gen: torch.Generator,
               t_max: float | None = None) -> tuple[torch.Tensor, ...]:
        """(x_t, t [B], eps): each sample on its straight path at a time uniform in t_range (up to t_max)."""
        lo, hi = self.opt.t_range[0], self.opt.t_range[1] if t_max is None else t_max
        t = lo + (hi - lo) * torch.rand(x0.shape[0], generator=gen)
        eps = torch.randn(x0.shape, generator=gen, dtype=torch.float32).to(x0)
        tb = t.reshape(-1, 1, 1, 1).to(x0)
        return (1 - tb) * x0 + tb * eps, t, eps

    def fake_loss(self, prompts: list[str], gen: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        """The fake model's flow-matching loss on a batch of the generator's samples, plus (GAN on) the
        classifier's weighted loss on them against a batch of noised real latents; and the parts' values."""
        x0 = self.sample(prompts, gen, grad=False)
        x_t, t, eps = self.noised(x0, gen)
        if self.classifier is None:
            v = self.real.velocity(self.fake, prompts, x_t, t)
            loss = ((v.float() - (eps - x0).float()) ** 2).mean()
            return loss, {"fake": float(loss.detach())}
        z, txt, vec = (x.to(self.device) for x in self.real_latents.draw(len(prompts), gen))
        t_max = self.opt.gan_t_max
        zr_t, tr, _ = self.noised(z.to(x0), gen, t_max)
        with last_hidden_states(self.fake) as h:
            v = self.real.velocity(self.fake, prompts, x_t, t)
            if t_max != self.opt.t_range[1]:  # the classifier's own noise levels: one more forward
                xg_t, tg, _ = self.noised(x0, gen, t_max)
                self.real.velocity(self.fake, prompts, xg_t, tg)
            self.real.velocity(self.fake, (txt, vec), zr_t, tr)
        flow = ((v.float() - (eps - x0).float()) ** 2).mean()
        cls = classifier_loss(self.classifier(h[-1]), self.classifier(h[-2]))
        return flow + self.opt.gan_classifier * cls, {"fake": float(flow.detach()),
                                                      "classifier": float(cls.detach())}

    def gan_loss(self, x0: torch.Tensor, prompts: list[str], gen: torch.Generator) -> torch.Tensor:
        """The generator's GAN loss at a noised copy of its samples x0 (with their graph); the fake model
        and the classifier are read, not trained, here."""
        x_t, t, _ = self.noised(x0, gen, self.opt.gan_t_max)
        nets = [self.fake, self.classifier]
        for n in nets:
            n.requires_grad_(False)
        try:
            with last_hidden_states(self.fake) as h:
                self.real.velocity(self.fake, prompts, x_t, t)
            return generator_gan_loss(self.classifier(h[0]))
        finally:
            for n in nets:
                n.requires_grad_(True)

    def regression_loss(self, gen: torch.Generator, n: int) -> torch.Tensor:
        """DMD1's regression: the first step's estimate from n couplings' noise against their endpoints."""
        c = self.couplings
        idx = torch.randint(len(c), (n,), generator=gen).tolist()
        noise, z0 = c.noise[idx].to(self.device), c.z0[idx].to(self.device)
        t = torch.tensor(self.ts[0])
        x0 = denoised(noise, self.gen.velocity(self.generator, [c.prompts[i] for i in idx], noise, t), t)
        return ((x0.float() - z0.float()) ** 2).mean()

    def generator_loss(self, prompts: list[str],
                       gen: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        """DMD's surrogate on a fresh batch (plus the weighted GAN loss when it is on), and the values: the
        surrogate, the mean distance of the two denoised estimates (gap) and the GAN loss."""
        x0 = self.sample(prompts, gen, grad=True)
        x_t, t, _ = self.noised(x0.detach(), gen)
        with torch.no_grad():
            x0_real = denoised(x_t, self.real.velocity(self.real.pipe.transformer, prompts, x_t, t,
                                                       self.opt.teacher_cfg), t)
            x0_fake = denoised(x_t, self.real.velocity(self.fake, prompts, x_t, t), t)
        if not torch.isfinite(x0).all() or not torch.isfinite(x0_real).all():
            raise RectiflowError("the generator's samples or the teacher's estimates contain inf/NaN: lower "
                                 "--lr")
        loss = distribution_matching_loss(x0, x0_real, x0_fake)
        stats = {"dmd": float(loss.detach()), "gap": float((x0_fake - x0_real).abs().mean())}
        if self.classifier is not None:  # the GAN term is on
            gan = self.gan_loss(x0, prompts, gen)
            loss = loss + self.opt.gan * gan
            stats["gan"] = float(gan.detach())
        return loss, stats


def dmd(pipe: Pipeline, teacher: Pipeline, pool: PromptPool, out: str | os.PathLike,
        options: DMDOptions | None = None, *, couplings=None, real: str | os.PathLike | None = None,
        progress: bool = True, card_extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Tune `pipe.transformer` in place into a generator of `teacher`'s CFG-guided distribution; writes
    OUT/state.pt as it goes, OUT/history.jsonl and OUT/bundle at the end. Returns the summary.
    couplings (rectiflow.data.couplings.CouplingsDataset): the regression loss's pairs; real: a `rectiflow
    cache` of real latents (the teacher's encoders) for the GAN term."""
    opt = options or DMDOptions()
    out = Path(out)
    run = _Run(pipe, teacher, opt, couplings, real)  # checks first: a refused run leaves no directory
    out.mkdir(parents=True, exist_ok=True)
    run.generator.requires_grad_(True).train(False)
    run.fake.requires_grad_(True).train(False)
    g_opt = torch.optim.AdamW(run.generator.parameters(), lr=opt.lr)
    f_opt = torch.optim.AdamW(run.fake_parameter_groups(), lr=opt.fake_lr)
    same = {k: v for k, v in opt.to_dict().items() if k not in ("iterations", "checkpoint_every")}
    same["t_range"] = list(same["t_range"])  # as torch.load gives it back
    meta = {"model": pipe.name, "model_hash": pipe.model_hash, "teacher": teacher.name,
            "teacher_hash": teacher.model_hash, "pool": pool.fingerprint(),
            "couplings": None if couplings is None else str(couplings.path),
            "real": None if real is None else str(run.real_latents.path), **same}
    start, history = 0, []
    before_gan = {"real": None, "gan": 0.0, "gan_classifier": CLASSIFIER_WEIGHT,  # runs saved without it
                  "classifier_lr": opt.fake_lr, "gan_t_max": opt.t_range[1]}
    state = load_run_state(out, meta, "DMD", opt.iterations, pipe.device, meta_defaults=before_gan)
    if state is not None:
        run.generator.load_state_dict(state["generator"])
        run.fake.load_state_dict(state["fake"])
        if run.classifier is not None:
            run.classifier.load_state_dict(state["classifier"])
        for o, saved in zip((g_opt, f_opt), state["optimizers"], strict=True):
            o.load_state_dict(saved)
        start, history = int(state["iteration"]), list(state["history"])
        log.info("resuming %s at iteration %d of %d", out, start, opt.iterations)
    bar = tqdm(range(start, opt.iterations), initial=start, total=opt.iterations, desc="dmd",
               disable=not progress)
    for it in bar:
        history.append(_iteration(run, pool, opt, g_opt, f_opt, it))
        h = history[-1]
        bar.set_postfix(dmd=f"{h['dmd']:.3f}", fake=f"{h['fake']:.3f}")
        if (it + 1) % opt.checkpoint_every == 0 or it + 1 == opt.iterations:
            nets = {"generator": run.generator.state_dict(), "fake": run.fake.state_dict()}
            if run.classifier is not None:
                nets["classifier"] = run.classifier.state_dict()
            save_run_state(out, {**nets, "optimizers": [g_opt.state_dict(), f_opt.state_dict()],
                                 "iteration": it + 1, "history": history, "meta": meta})
    run.generator.requires_grad_(False)
    summary = {"iterations": opt.iterations, "samples": opt.iterations * opt.batch * (1 + opt.fake_updates),
               "first_gap": history[0]["gap"], "last_gap": history[-1]["gap"],
               "source": {"name": pipe.name, "model_hash": pipe.model_hash},
               "teacher": {"name": teacher.name, "model_hash": teacher.model_hash}, "options": opt.to_dict()}
    defaults = dataclasses.replace(pipe.defaults, steps=run.steps, shift=run.shift, cfg_scale=1.0)
    save_bundle(out / "bundle", run.generator, pipe.autoencoder, pipe.text_encoder, defaults,
                card_extra={"dmd": summary, **dict(card_extra or {})}, name=f"{pipe.name}-dmd",
                flow_path=pipe.flow_path)
    return summary


def _iteration(run: _Run, pool: PromptPool, opt: DMDOptions, g_opt, f_opt, it: int) -> dict[str, Any]:
    rng = np.random.default_rng([opt.seed, it])
    gen = torch.Generator("cpu").manual_seed(int(rng.integers(2**62)))
    fake: dict[str, float] = {}
    for _ in range(opt.fake_updates):
        prompts = [p for _, p in pool.draw(opt.batch, rng)]
        f_opt.zero_grad(set_to_none=True)
        loss, parts = run.fake_loss(prompts, gen)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(run.fake_parameters(), opt.max_grad_norm)
        f_opt.step()
        for k, v in parts.items():
            fake[k] = fake.get(k, 0.0) + v / opt.fake_updates
    prompts = [p for _, p in pool.draw(opt.batch, rng)]
    g_opt.zero_grad(set_to_none=True)
    loss, stats = run.generator_loss(prompts, gen)  # the teacher runs without a graph
    gap = stats.pop("gap")
    if opt.regression > 0:
        reg = run.regression_loss(gen, opt.batch)
        loss = loss + opt.regression * reg
        stats["regression"] = float(reg.detach())
    loss.backward()
    torch.nn.utils.clip_grad_norm_(run.generator.parameters(), opt.max_grad_norm)
    g_opt.step()
    return {"iteration": it + 1, **stats, **fake, "gap": gap}
