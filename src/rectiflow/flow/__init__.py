"""rectiflow.flow: all flow math of the project, as pure vectorised functions (no state, no device probing).

Convention (docs/design.md section 1): t in [0, 1], t = 0 data, t = 1 noise; x_t = (1 - t) x0 + t eps for
rectified flow, whose network predicts v = eps - x0; sampling integrates t: 1 -> 0 with
x <- x + (t_next - t) v.

Paths (rectiflow.flow.paths): frozen dataclasses, `get_path(name, **params)`, names "rectified_flow",
"eps_linear", "v_cosine", "edm" (SD3 section 3.1 formulations). t is a tensor [B] (broadcast over x [B, ...]),
a 0-d tensor or a float; coefficient math runs in float64 and is cast to x's dtype.
    path.interpolate(x0, eps, t) -> x_t            path.target(x0, eps, t) -> training target
    path.model_input(x_t, t) -> network input       (identity except EDM's c_in)
    path.to_velocity(out, x_t, t) -> dx/dt          path.to_x0(out, x_t, t), path.to_eps(out, x_t, t)
    path.log_snr(t), path.eps_weight(t)             SD3's lambda_t and w_t (float64)
    training_pair(path, x0, eps, t) -> (x_t, target)
    velocity_fn_from_model(path, model_fn) -> velocity_fn(x, t) for the solvers (model_fn(net_in, t) -> out)
    equivalent_rf_weight(path, t) -> per-sample RF-loss weight reproducing `path`'s objective
    path_record(path) -> JSON-able record (name, params, prediction, timestep input) a bundle stores;
    path_from_record(record, where) -> path, refusing a record without a path or one it cannot sample
  Training step:  x_t, tgt = training_pair(path, x0, eps, t); out = model(path.model_input(x_t, t), t);
                  loss = ((out - tgt) ** 2 * loss_weight(...)[:, None, None]).mean()

Timestep samplers (rectiflow.flow.timesteps): `sample_timesteps(name, n, generator, device=None,
dtype=torch.float32, **params) -> t [n]`; names "uniform", "logit_normal" (m=0, s=1), "mode" (s=1.29),
"cosmap", "u_shaped" (a=4); each also as a function `uniform(n, *, generator, device=None, dtype=...)`
etc. and its density `*_pdf(t, ...)`. `loss_weight(name, t, **params)` for "none", "logit_normal", "mode",
"cosmap", "u_shaped", "sigma_sqrt". Losses (rectiflow.flow.losses): `per_sample_loss(name, out, target,
dims, **params)` for "mse" and "pseudo_huber" (c).
The generator must be a CPU torch.Generator.

Inference grids (rectiflow.flow.schedules): `timestep_grid(steps, *, shift=None | "flux" | alpha,
seq_len=None, t_last=None, dtype=torch.float64) -> [steps + 1]` (t[0] = 1, t[-1] = 0, decreasing);
`linear_grid`, `flux_mu(seq_len, 256, 4096, 0.5, 1.15)`, `time_shift(mu, sigma, t)`, `sd3_shift(t, alpha)`.
`TimeShift` (None | "flux" | alpha) is the one type of a time shift; `parse_time_shift(value, where)` turns a
flag, config value or card entry into it ("none"/"linear"/"" -> None), with a one-line error otherwise.

Solvers (rectiflow.flow.solvers): `solve(velocity_fn, x, timesteps, method="euler"|"midpoint"|"heun"|"rk4",
*, callback=None, progress=False) -> x`; `solve_adaptive(velocity_fn, x, t0=1.0, t1=0.0, rtol=1e-5,
atol=1e-5, max_steps=10000) -> (x, nfe)`; `solver_nfe(method, timesteps)`. velocity_fn(x, t) gets t as a 0-d
tensor on x's device (float64 for float64 x, else float32); broadcast it to [B] in the model wrapper.
NFE: euler N, midpoint 2N, heun 2N - 1 when the grid ends at 0 (last step Euler, Karras 2022), rk4 4N.

Straightness (rectiflow.flow.straightness, Liu et al. 2022 eq. 8): `straightness(velocity_fn, noise,
steps=64, buckets=8) -> Straightness(value, per_sample, by_bucket, endpoint, steps)`: S = E_t E ||(z_1 - z_0)
- v(z_t, t)||^2 on the model's own Euler trajectory, averaged over elements; `endpoint_errors(velocity_fn,
noise, reference, steps=(1, 2, 4)) -> {n: mean RMS distance}`; `rms_distance(a, b) -> [B]`.

Guidance (rectiflow.flow.guidance): `cfg_combine(v_cond, v_uncond, scale)`; the doubled batch's order:
`cfg_batch(cond, uncond)` -> [uncond; cond], `cfg_guide(out, scale)`; `cfg_velocity_fn(model_fn, scale,
interval=None, cond_fn=None)` where model_fn(cat([x, x]), t) returns [uncond; cond] halves (interval (lo, hi):
guide only at lo <= t <= hi; `check_cfg_interval`, `cfg_scale_at(t, scale, interval)`);
`guidance_vector(value, batch, device, dtype) -> [B]` (FLUX-dev's raw guidance scale, the x1000 lives in the
embedder).

Contrastive flow matching (rectiflow.flow.contrastive): `contrastive_loss(per_sample, negative, weight,
active)` = per_sample - weight * negative on the active rows; `batch_negatives(x0, noise)` (Delta-FM's
in-batch negatives); `differs(sample, negative)` (a negative equal to its sample is none);
`check_contrastive(kind, weight)`.

A sampler as a stochastic policy (rectiflow.flow.policy, for reward fine-tuning): `sde_step(x, v, t, t_next,
eta, t_cap)` (Flow-GRPO's marginal-preserving SDE) and `cps_step(x, v, t, t_next, eta)` (coefficients-
preserving) -> (mean, std) of one step, `policy_step(kind, ...)`; `gaussian_logprob`, `gaussian_kl` (means
over elements); `group_advantages(rewards, group_size)`; `clipped_surrogate(logp, logp_old, advantages)`;
`advantage_weighted_matching(v, target, advantages)` (the flow-matching loss weighted per row, AWM).

Distribution matching distillation (rectiflow.flow.distribution_matching, DMD/DMD2): `denoised(x_t, v, t)`
(x0^ = x_t - t v), `distribution_matching_gradient(x0, x0_real, x0_fake)` (DMD's normalised score
difference), `distribution_matching_loss(...)` (the surrogate whose gradient it is); DMD2's `T_RANGE` and
`FAKE_UPDATES`.
"""

from rectiflow.flow.contrastive import (
    CONTRASTIVE,
    batch_negatives,
    check_contrastive,
    contrastive_loss,
    differs,
)
from rectiflow.flow.distribution_matching import (
    FAKE_UPDATES,
    T_RANGE,
    denoised,
    distribution_matching_gradient,
    distribution_matching_loss,
)
from rectiflow.flow.guidance import (
    cfg_batch,
    cfg_combine,
    cfg_guide,
    cfg_scale_at,
    cfg_velocity_fn,
    check_cfg_interval,
    guidance_vector,
)
from rectiflow.flow.losses import LOSSES, per_sample_loss
from rectiflow.flow.paths import (
    EDM,
    PATHS,
    EpsLinear,
    Path,
    RectifiedFlow,
    VCosine,
    equivalent_rf_weight,
    get_path,
    path_from_record,
    path_record,
    t_from_log_snr,
    training_pair,
    velocity_fn_from_model,
)
from rectiflow.flow.policy import (
    STEP_KINDS,
    advantage_weighted_matching,
    clipped_surrogate,
    cps_step,
    gaussian_kl,
    gaussian_logprob,
    group_advantages,
    policy_step,
    sde_step,
)
from rectiflow.flow.schedules import (
    TimeShift,
    flux_mu,
    linear_grid,
    parse_time_shift,
    sd3_shift,
    time_shift,
    timestep_grid,
)
from rectiflow.flow.solvers import METHODS, solve, solve_adaptive, solver_nfe
from rectiflow.flow.straightness import Straightness, endpoint_errors, rms_distance, straightness
from rectiflow.flow.timesteps import (
    LOSS_WEIGHTS,
    SAMPLERS,
    cosmap,
    cosmap_pdf,
    logit_normal,
    logit_normal_pdf,
    loss_weight,
    mode,
    mode_pdf,
    sample_timesteps,
    u_shaped,
    u_shaped_pdf,
    uniform,
    uniform_pdf,
)

__all__ = [
    "FAKE_UPDATES", "T_RANGE", "denoised", "distribution_matching_gradient", "distribution_matching_loss",
    "STEP_KINDS", "advantage_weighted_matching", "clipped_surrogate", "cps_step", "gaussian_kl",
    "gaussian_logprob", "group_advantages", "policy_step", "sde_step",
    "CONTRASTIVE", "EDM", "LOSSES", "LOSS_WEIGHTS", "METHODS", "PATHS", "SAMPLERS", "EpsLinear", "Path",
    "RectifiedFlow",
    "Straightness", "TimeShift", "VCosine", "cfg_batch", "cfg_combine", "cfg_guide", "cfg_scale_at",
    "cfg_velocity_fn", "check_cfg_interval", "batch_negatives", "check_contrastive", "contrastive_loss",
    "differs",
    "cosmap", "cosmap_pdf", "endpoint_errors", "equivalent_rf_weight", "flux_mu", "get_path",
    "guidance_vector", "linear_grid", "logit_normal", "logit_normal_pdf", "loss_weight", "mode", "mode_pdf",
    "parse_time_shift", "path_from_record", "path_record", "per_sample_loss", "rms_distance",
    "sample_timesteps", "sd3_shift",
    "solve", "solve_adaptive", "solver_nfe", "straightness", "t_from_log_snr", "time_shift", "timestep_grid",
    "training_pair", "u_shaped", "u_shaped_pdf", "uniform", "uniform_pdf", "velocity_fn_from_model",
]
