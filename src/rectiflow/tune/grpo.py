"""Reward fine-tuning with Flow-GRPO: sample groups of images per prompt, score them, move the sampler toward
the better ones of each group (rectiflow.flow.policy has the math and its sources).

One iteration: P prompts drawn from the pool, G images each from seeded noise with the bundle's own sampler
settings (steps, shift, CFG), the first `sde_steps` steps stochastic (a coefficients-preserving step or
Flow-GRPO's SDE, at noise level eta) and the rest the ODE's Euler steps; the images are decoded and scored
by `reward(prompts, images)`; advantages are group-relative; then for minibatches of the rollouts, one
optimizer step on the clipped surrogate of every stochastic step's log-likelihood, plus kl_weight times the
KL to the starting model. objective="awm" instead rolls out the ODE and trains on the advantage-weighted
flow-matching loss of its images at the sampler's times (rectiflow.flow.policy.advantage_weighted_matching).

Sampling the tuned model needs nothing new: it is the ODE (eta = 0) of the same sampler, as `rectiflow
generate` runs it. The run resumes from OUT/state.pt (model, optimizer, iteration, history; rollouts are
seeded by (seed, iteration), so a resumed run is the uninterrupted one) and exports OUT/bundle.

Why here (above train and sample): the loop samples (sample.Pipeline), trains, and is handed a reward
(the shapes benchmark's scorer lives in eval; the CLI passes it in)."""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from rectiflow.convert.bundle import save_bundle
from rectiflow.errors import ConfigError, RectiflowError
from rectiflow.flow import timestep_grid
from rectiflow.flow.policy import (
    ADVANTAGE_CLIP,
    CLIP_RANGE,
    CPS_ETA,
    ETA,
    STEP_KINDS,
    advantage_weighted_matching,
    clipped_surrogate,
    gaussian_kl,
    gaussian_logprob,
    group_advantages,
    policy_step,
)
from rectiflow.sample.pipeline import Pipeline, initial_noise
from rectiflow.tune.prompts import PromptEmbeddings, PromptPool
from rectiflow.tune.run_state import load_run_state, save_run_state

__all__ = ["GRPOOptions", "Reward", "grpo"]

log = logging.getLogger(__name__)
OBJECTIVES = ("grpo", "awm")
Reward = Callable[[list[str], list], list[float]]  # (prompts, PIL images) -> one reward per image


@dataclass(frozen=True)
class GRPOOptions:
    """iterations: rollout + update rounds; prompts x group_size images per round; steps / shift / cfg_scale:
    the sampler (None: the bundle's defaults); step: the stochastic step, "cps" (coefficients-preserving) or
    "sde" (Flow-GRPO's SDE); eta: its noise level (None: CPS 0.8, SDE 0.7, Flow-GRPO's); sde_steps: how many
    of the first steps are stochastic (None: all but the last, which ends on the image); minibatch: images
    per optimizer step; kl_weight: Flow-GRPO's KL to the starting model on the stochastic steps; anchor
    (ours): the weight of the velocity's mean squared distance to the starting model's at every state of the
    rollout, the deterministic steps included, which nothing else ties to the starting model. objective:
    "grpo" (the clipped surrogate on stochastic steps) or "awm" (advantage-weighted flow matching on the
    ODE's own samples at the sampler's times: x_t = (1 - t) x0 + t eps with fresh eps, target eps - x0; it
    rolls out the ODE, so sde_steps, step, eta, kl_weight and clip_range are unused)."""

    iterations: int = 100
    objective: str = "grpo"
    prompts: int = 8
    group_size: int = 8
    steps: int | None = None
    shift: Any = "default"
    cfg_scale: float | None = None
    sde_steps: int | None = None
    step: str = "cps"
    eta: float | None = None
    lr: float = 1e-5
    kl_weight: float = 0.04  # Flow-GRPO's beta for GenEval (their config/grpo.py)
    anchor: float = 1.0  # docs/tune.md: without it the deterministic steps drift and colours fail
    clip_range: float = CLIP_RANGE
    advantage_clip: float = ADVANTAGE_CLIP
    minibatch: int = 16
    max_grad_norm: float = 1.0  # Flow-GRPO's train.max_grad_norm
    checkpoint_every: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        ints = {"iterations": 1, "prompts": 1, "group_size": 2, "minibatch": 1, "checkpoint_every": 1}
        for name, low in ints.items():
            v = getattr(self, name)
            if not isinstance(v, int) or v < low:
                why = " (advantages are relative to a group)" if name == "group_size" else ""
                raise ConfigError(f"{name} must be an integer >= {low}{why}, got {v!r}")
        if self.steps is not None and (not isinstance(self.steps, int) or self.steps < 1):
            raise ConfigError(f"steps must be an integer >= 1, got {self.steps!r}")
        if self.sde_steps is not None and (not isinstance(self.sde_steps, int) or self.sde_steps < 1):
            raise ConfigError(f"sde_steps must be an integer >= 1, got {self.sde_steps!r}")
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"unknown objective {self.objective!r}; choose one of {', '.join(OBJECTIVES)}")
        if self.objective == "awm" and (self.sde_steps is not None or self.eta is not None):
            raise ConfigError("sde_steps and eta set stochastic steps, which the awm objective does not take "
                              "(it rolls out the ODE); drop them or use objective grpo")
        if self.step not in STEP_KINDS:
            raise ConfigError(f"unknown stochastic step {self.step!r}; choose one of {', '.join(STEP_KINDS)}")
        if self.eta is None:  # frozen: resolve the default once
            object.__setattr__(self, "eta", CPS_ETA if self.step == "cps" else ETA)
        if self.step == "cps" and self.eta > 1:
            raise ConfigError(f"the CPS noise level eta must be in (0, 1], got {self.eta}")
        for name in ("eta", "lr", "clip_range", "advantage_clip"):
            if not float(getattr(self, name)) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("kl_weight", "anchor"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class _Rollout:
    xs: list[torch.Tensor]  # model-space states before each step (grpo)
    nexts: list[torch.Tensor]  # the sampled states after each stochastic step
    logp: list[torch.Tensor]  # their log-likelihood under the sampling policy [N]
    final: torch.Tensor | None = None  # the model-space endpoint
    eps: list[torch.Tensor] = dataclasses.field(default_factory=list)  # "awm": fresh noise per step


class _Policy:
    """The trainable model, its frozen reference and the sampler settings, for one bundle."""

    def __init__(self, pipe: Pipeline, opt: GRPOOptions):
        d = pipe.defaults
        self.pipe, self.opt = pipe, opt
        self.steps = d.steps if opt.steps is None else opt.steps
        self.shift = d.shift if opt.shift == "default" else opt.shift
        self.cfg = d.cfg_scale if opt.cfg_scale is None else float(opt.cfg_scale)
        self.guidance = d.guidance
        self.lh, self.lw = d.height // pipe.downsample, d.width // pipe.downsample
        self.sde_steps = opt.sde_steps if opt.sde_steps is not None else max(1, self.steps - 1)
        if opt.objective == "awm":
            self.sde_steps = 0  # the ODE itself is rolled out
        if self.sde_steps > self.steps:
            raise ConfigError(f"sde_steps={self.sde_steps} is more than the sampler's {self.steps} steps")
        if opt.objective == "grpo" and opt.step == "cps" and self.sde_steps == self.steps:
            raise ConfigError(f"sde_steps={self.sde_steps}: a CPS step ending at t = 0 has no noise; use at "
                              f"most {self.steps - 1} (a one-step model needs --step sde)")
        grid = timestep_grid(self.steps, shift=self.shift, seq_len=pipe.image_tokens(self.lh, self.lw))
        self.ts = [float(t) for t in grid]
        regularised = (opt.kl_weight > 0 and opt.objective == "grpo") or opt.anchor > 0
        self.ref = copy.deepcopy(pipe.transformer).requires_grad_(False) if regularised else None
        self.embed = PromptEmbeddings(pipe)

    def step(self, x: torch.Tensor, v: torch.Tensor, t: float, tn: float) -> tuple[torch.Tensor, float]:
        return policy_step(self.opt.step, x, v, t, tn, self.opt.eta, t_cap=self.ts[1])

    def velocity(self, transformer, cond, x: torch.Tensor, t: float) -> torch.Tensor:
        uncond = None
        if self.cfg != 1.0:
            e = self.embed([""] * x.shape[0])
            uncond = (e[0], e[1])
        pipe = self.pipe
        if transformer is not pipe.transformer:
            pipe = copy.copy(self.pipe)
            pipe.transformer = transformer
        fn = pipe.velocity_fn(cond, uncond, self.lh, self.lw, self.guidance, self.cfg)
        return fn(x, torch.tensor(t, dtype=torch.float32, device=x.device))

    def rollout(self, cond, n: int, gen: torch.Generator) -> tuple[_Rollout, torch.Tensor]:
        """Sample n trajectories; returns every step's state, the stochastic steps' samples and likelihoods,
        and the final latents [n, C, lh, lw]."""
        p = self.pipe
        noise = initial_noise(None, n, p.autoencoder.params.z_channels, self.lh, self.lw, gen)
        x = p.family.pack(noise.to(p.device, p.dtype))
        ro = _Rollout([], [], [])
        with torch.no_grad():
            for k in range(self.steps):
                t, tn = self.ts[k], self.ts[k + 1]
                v = self.velocity(p.transformer, cond, x, t)
                if self.opt.objective == "grpo":  # awm trains at fresh interpolants, not these states
                    ro.xs.append(x)
                if k < self.sde_steps:
                    mean, std = self.step(x, v, t, tn)
                    eps = torch.randn(x.shape, generator=gen, dtype=torch.float32).to(x.device, x.dtype)
                    x = mean + std * eps
                    ro.nexts.append(x)
                    ro.logp.append(gaussian_logprob(x, mean, std))
                else:
                    x = x + (tn - t) * v
        if not torch.isfinite(x).all():
            raise RectiflowError("the rollout's latents contain inf/NaN: lower --lr or --eta")
        ro.final = x
        if self.opt.objective == "awm":  # drawn here, from the iteration's generator: a resume redraws them
            ro.eps = [torch.randn(x.shape, generator=gen, dtype=torch.float32).to(x.device, x.dtype)
                      for _ in range(self.steps)]
        return ro, p.family.unpack(x, self.lh, self.lw)

    def loss(self, ro: _Rollout, cond, idx: torch.Tensor, adv: torch.Tensor) -> dict[str, float]:
        """Backpropagate the minibatch `idx`'s loss: the surrogate and KL of every stochastic step (or, for
        "awm", the advantage-weighted matching loss at every step) and, with an anchor, the velocity's
        squared distance to the starting model's at the same points; returns its statistics (means over the
        steps each term covers)."""
        stats = {"surrogate": 0.0, "kl": 0.0, "clipped": 0.0, "anchor": 0.0}
        n_sde = len(ro.nexts)
        awm = self.opt.objective == "awm"
        steps = self.steps if awm else len(ro.xs) if self.opt.anchor else n_sde
        for k in range(steps):
            t, tn = self.ts[k], self.ts[k + 1]
            if awm:  # a fresh point of the endpoint's straight path at time t
                x = (1.0 - t) * ro.final[idx] + t * ro.eps[k][idx]
            else:
                x = ro.xs[k][idx]
            v = self.velocity(self.pipe.transformer, cond, x, t)
            v_ref = None
            if self.ref is not None:
                with torch.no_grad():
                    v_ref = self.velocity(self.ref, cond, x, t)
            loss = v.new_zeros(())
            if awm:
                target = ro.eps[k][idx] - ro.final[idx]
                sur = advantage_weighted_matching(v, target, adv).mean()
                loss = loss + sur
                stats["surrogate"] += float(sur.detach()) / steps
            elif k < n_sde:
                mean, std = self.step(x, v, t, tn)
                logp = gaussian_logprob(ro.nexts[k][idx], mean, std)
                sur = clipped_surrogate(logp, ro.logp[k][idx], adv, self.opt.clip_range).mean()
                loss = loss + sur
                if self.opt.kl_weight:
                    kl = gaussian_kl(mean, self.step(x, v_ref, t, tn)[0], std).mean()
                    loss = loss + self.opt.kl_weight * kl
                    stats["kl"] += float(kl.detach()) / n_sde
                ratio = torch.exp(logp.detach() - ro.logp[k][idx])
                stats["surrogate"] += float(sur.detach()) / n_sde
                stats["clipped"] += float(((ratio - 1).abs() > self.opt.clip_range).float().mean()) / n_sde
            if self.opt.anchor:
                drift = ((v.float() - v_ref.float()) ** 2).mean()
                loss = loss + self.opt.anchor * drift
                stats["anchor"] += float(drift.detach()) / steps
            (loss / steps).backward()
        return stats


def grpo(pipe: Pipeline, pool: PromptPool, reward: Reward, out: str | os.PathLike,
         options: GRPOOptions | None = None, *, progress: bool = True,
         card_extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Tune `pipe.transformer` in place with Flow-GRPO against `reward`; writes OUT/state.pt as it goes,
    OUT/history.jsonl (one line per iteration) and OUT/bundle at the end. Returns the summary."""
    opt = options or GRPOOptions()
    out = Path(out)
    policy = _Policy(pipe, opt)  # checks first: a refused run leaves no directory
    out.mkdir(parents=True, exist_ok=True)
    model = pipe.transformer
    model.requires_grad_(True).train(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=opt.lr, weight_decay=1e-4)  # Flow-GRPO's decay
    # what a resumed run must share; more iterations extend a run (rollouts are seeded per iteration)
    same = {k: v for k, v in opt.to_dict().items() if k not in ("iterations", "checkpoint_every")}
    meta = {"model": pipe.name, "model_hash": pipe.model_hash, "pool": pool.fingerprint(), **same}
    start, history = 0, []
    state = load_run_state(out, meta, "GRPO", opt.iterations, pipe.device,
                           meta_defaults={"objective": "grpo"})  # runs from before the option were GRPO runs
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start, history = int(state["iteration"]), list(state["history"])
        log.info("resuming %s at iteration %d of %d", out, start, opt.iterations)
    bar = tqdm(range(start, opt.iterations), initial=start, total=opt.iterations, desc="grpo",
               disable=not progress)
    for it in bar:
        history.append(_iteration(policy, pool, reward, opt, optimizer, it))
        h = history[-1]
        bar.set_postfix(reward=f"{h['reward']:.3f}", kl=f"{h['kl']:.2e}")
        if (it + 1) % opt.checkpoint_every == 0 or it + 1 == opt.iterations:
            save_run_state(out, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                 "iteration": it + 1, "history": history, "meta": meta})
            recent = history[-opt.checkpoint_every:]
            log.info("iteration %d/%d: mean reward %.3f over the last %d rounds, KL %.2e", it + 1,
                     opt.iterations, sum(x["reward"] for x in recent) / len(recent), len(recent), h["kl"])
    model.requires_grad_(False)
    summary = {"iterations": opt.iterations, "images": opt.iterations * opt.prompts * opt.group_size,
               "first_reward": history[0]["reward"], "last_reward": history[-1]["reward"],
               "source": {"name": pipe.name, "model_hash": pipe.model_hash}, "options": opt.to_dict()}
    extra = {"grpo": summary, **dict(card_extra or {})}
    # the sampler it was tuned for becomes its default (e.g. 4 steps for a model shipped with 8)
    defaults = dataclasses.replace(pipe.defaults, steps=policy.steps, shift=policy.shift,
                                   cfg_scale=policy.cfg)
    save_bundle(out / "bundle", model, pipe.autoencoder, pipe.text_encoder, defaults,
                card_extra=extra, name=f"{pipe.name}-grpo", flow_path=pipe.flow_path)
    return summary


def _iteration(policy: _Policy, pool: PromptPool, reward: Reward, opt: GRPOOptions, optimizer,
               it: int) -> dict[str, Any]:
    drawn = pool.draw(opt.prompts, np.random.default_rng([opt.seed, it]))
    groups = [g for g, _ in drawn for _ in range(opt.group_size)]
    prompts = [p for _, p in drawn for _ in range(opt.group_size)]
    cond = policy.embed(prompts)
    gen = torch.Generator("cpu").manual_seed(int(np.random.default_rng([opt.seed, it, 1]).integers(2**62)))
    ro, z = policy.rollout(cond, len(prompts), gen)
    rewards = torch.tensor([float(r) for r in reward(prompts, policy.pipe.decode(z))], dtype=torch.float32)
    if rewards.shape != (len(prompts),):
        raise RectiflowError(f"the reward returned {rewards.numel()} values for {len(prompts)} images")
    adv = group_advantages(rewards, opt.group_size, opt.advantage_clip).to(z.device)
    active = torch.nonzero(adv != 0).flatten()
    order = active[torch.randperm(active.numel(), generator=gen)]
    stats = {"surrogate": 0.0, "kl": 0.0, "clipped": 0.0, "anchor": 0.0}
    batches = [order[i:i + opt.minibatch] for i in range(0, order.numel(), opt.minibatch)]
    for idx in batches:
        optimizer.zero_grad(set_to_none=True)
        s = policy.loss(ro, (cond[0][idx], cond[1][idx]), idx, adv[idx])
        torch.nn.utils.clip_grad_norm_(policy.pipe.transformer.parameters(), opt.max_grad_norm)
        optimizer.step()
        for key in stats:
            stats[key] += s[key] / len(batches)
    by_group = {}
    for g in sorted(set(groups)):
        rows = [i for i, x in enumerate(groups) if x == g]
        by_group[g] = float(rewards[rows].mean())
    return {"iteration": it + 1, "reward": float(rewards.mean()), "by_group": by_group,
            "active": int(active.numel()), **stats}
