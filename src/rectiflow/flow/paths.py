"""Forward processes ("paths") x_t = a_t x0 + b_t eps and the network parameterisations trained on them.

Every formulation compared in SD3 (Esser et al. 2024, "Scaling Rectified Flow Transformers for
High-Resolution Image Synthesis", arXiv:2403.03206, sections 2 and 3.1) is expressed in OUR time
convention: t in [0, 1], t = 0 is data, t = 1 is (approximately) pure noise, and sampling integrates
t: 1 -> 0. A path is a frozen dataclass with:

    interpolate(x0, eps, t) -> x_t             a_t x0 + b_t eps
    target(x0, eps, t)      -> training target of the network output (the loss is ||out - target||^2)
    to_x0 / to_eps(out, x_t, t)                estimates implied by a network output `out` at (x_t, t)
    to_velocity(out, x_t, t) -> dx/dt           = a'_t x0_hat + b'_t eps_hat (all paths share the solvers)
    model_input(x_t, t)     -> what the network sees (identity except EDM's c_in preconditioning)
    log_snr(t)              -> lambda_t = log(a_t^2 / b_t^2)
    eps_weight(t)           -> SD3's w_t: the unweighted loss = -1/2 w_t lambda'_t ||eps_hat - eps||^2

`t` is a tensor [B] (broadcast over the trailing dims of x), a 0-d tensor or a python float. The
coefficients are computed in float64 on t's device and cast to the dtype/device of x. To keep every
coefficient and derivative finite, t is clamped to [t_min, t_max] (documented per path; T_EPS = 1e-5 where
a clamp is needed: the VP/EDM derivatives diverge like 1/sqrt(t) or faster at an endpoint).

The network is always conditioned on the raw t in [0, 1] (the x1000 scale lives in the timestep embedder),
also for EDM, where t is a monotone reparameterisation of Karras' c_noise = ln(sigma) / 4.

A trained model is only meaningful with its path: `path_record(path)` is what a bundle stores (name,
parameters, what the network predicts, the timestep it is fed) and `path_from_record` restores it, refusing
records it cannot honour, so that sampling converts the network output with `to_velocity` of the right path.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from rectiflow.errors import ConfigError

# Endpoint clamp for paths whose coefficients or derivatives diverge at t = 0 or t = 1 (see module doc).
T_EPS = 1e-5
# The timestep every path feeds the network: t in [0, 1], 1 = noise (the x1000 lives in the embedder).
TIMESTEP_INPUT = "t"


def _as_t(t: Tensor | float, like: Tensor | None = None) -> Tensor:
    """t as a float64 tensor (on t's device; CPU for python floats or MPS, which lacks float64)."""
    if not isinstance(t, Tensor):
        return torch.tensor(float(t), dtype=torch.float64)
    dev = t.device if t.device.type != "mps" else torch.device("cpu")
    return t.to(device=dev, dtype=torch.float64)


def _bcast(c: Tensor, x: Tensor) -> Tensor:
    """Coefficient [B] or [] -> [B, 1, ..., 1] (or []) in x's dtype/device, to broadcast against x."""
    c = c.to(device=x.device, dtype=x.dtype)
    if c.ndim == 0:
        return c
    if c.ndim != 1 or c.shape[0] != x.shape[0]:
        raise ConfigError(f"t has shape {tuple(c.shape)} but x has batch {x.shape[0]}; pass t as [B]")
    return c.view(-1, *([1] * (x.ndim - 1)))  # [B] -> [B, 1, ..., 1]


@dataclass(frozen=True)
class Path:
    """Base class: subclasses define `_coeffs` (a, b, a', b') and their parameterisation."""

    t_min: float = 0.0
    t_max: float = 1.0
    name: str = field(default="", init=False)
    prediction: ClassVar[str] = ""  # what the network output is, e.g. "velocity" (eps - x0) or "eps"

    def __post_init__(self) -> None:
        if not 0.0 <= self.t_min < self.t_max <= 1.0:
            raise ConfigError(f"path needs 0 <= t_min < t_max <= 1, got {self.t_min}, {self.t_max}")

    # -- to implement -------------------------------------------------------------------------------
    def _coeffs(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(a_t, b_t, da/dt, db/dt) in float64 for an already clamped float64 t."""
        raise NotImplementedError

    def target(self, x0: Tensor, eps: Tensor, t: Tensor | float) -> Tensor:
        raise NotImplementedError

    def _x0_eps(self, out: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """(x0_hat, eps_hat) from the network output; t already clamped float64."""
        raise NotImplementedError

    def eps_weight(self, t: Tensor | float) -> Tensor:
        raise NotImplementedError

    # -- shared --------------------------------------------------------------------------------------
    def clamp(self, t: Tensor | float) -> Tensor:
        """t as float64, clamped to [t_min, t_max]."""
        return _as_t(t).clamp(self.t_min, self.t_max)

    def coeffs(self, t: Tensor | float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(a_t, b_t, a'_t, b'_t) as float64 tensors shaped like t."""
        return self._coeffs(self.clamp(t))

    def interpolate(self, x0: Tensor, eps: Tensor, t: Tensor | float) -> Tensor:
        a, b, _, _ = self.coeffs(t)
        return _bcast(a, x0) * x0 + _bcast(b, x0) * eps

    def to_x0(self, out: Tensor, x_t: Tensor, t: Tensor | float) -> Tensor:
        return self._x0_eps(out, x_t, self.clamp(t))[0]

    def to_eps(self, out: Tensor, x_t: Tensor, t: Tensor | float) -> Tensor:
        return self._x0_eps(out, x_t, self.clamp(t))[1]

    def to_velocity(self, out: Tensor, x_t: Tensor, t: Tensor | float) -> Tensor:
        """dx_t/dt along the path through (x0_hat, eps_hat): a'_t x0_hat + b'_t eps_hat."""
        tc = self.clamp(t)
        x0, eps = self._x0_eps(out, x_t, tc)
        _, _, da, db = self._coeffs(tc)
        return _bcast(da, x_t) * x0 + _bcast(db, x_t) * eps

    def model_input(self, x_t: Tensor, t: Tensor | float) -> Tensor:
        """What the network is fed at (x_t, t); identity unless the path preconditions its input."""
        return x_t

    def log_snr(self, t: Tensor | float) -> Tensor:
        """lambda_t = log(a_t^2 / b_t^2) (SD3 section 2), float64."""
        a, b, _, _ = self.coeffs(t)
        return 2.0 * (torch.log(a) - torch.log(b))


@dataclass(frozen=True)
class RectifiedFlow(Path):
    """Rectified flow (SD3 section 3.1 "RF"): x_t = (1 - t) x0 + t eps, target v = eps - x0 = dx_t/dt.

    No division anywhere (x0_hat = x_t - t v, eps_hat = x_t + (1 - t) v), so no clamp: [0, 1].
    eps_weight: w_t^RF = t / (1 - t) (SD3 eq. after (5)).
    """

    name: str = field(default="rectified_flow", init=False)
    prediction: ClassVar[str] = "velocity"

    def _coeffs(self, t):
        return 1.0 - t, t, -torch.ones_like(t), torch.ones_like(t)

    def target(self, x0, eps, t):
        return eps - x0

    def _x0_eps(self, out, x_t, t):
        tb = _bcast(t, x_t)
        return x_t - tb * out, x_t + (1.0 - tb) * out

    def to_velocity(self, out, x_t, t):
        return out

    def eps_weight(self, t):
        t = self.clamp(t)
        return t / (1.0 - t)


@dataclass(frozen=True)
class EpsLinear(Path):
    """LDM's "scaled linear" VP schedule with eps-prediction (SD3 section 3.1 "(LDM-)Linear").

    Discrete schedule (Rombach et al. 2022 configs: linear_start 0.00085, linear_end 0.012, 1000 steps):
        beta_j = (sqrt(beta_0) + j / (T - 1) (sqrt(beta_{T-1}) - sqrt(beta_0)))^2,
        alpha_bar_i = prod_{j<=i} (1 - beta_j),  a = sqrt(alpha_bar), b = sqrt(1 - alpha_bar).
    Continuous t: discrete step i sits at t = (i + 1) / T, and t = 0 is clean data (alpha_bar = 1). The
    sum is replaced by its midpoint-rule integral, which has a closed form (u = sqrt(beta) is linear in j):
        log alpha_bar(t) = [G(u(tT - 1/2)) - G(u(-1/2))] / du,   G(u) = int log(1 - u^2) du
                         = (1 + u) log(1 + u) - (1 - u) log(1 - u) - 2u,
    smooth in t and within ~1e-6 (relative) of the discrete cumprod at the knots (tested against diffusers'
    DDPMScheduler). d log alpha_bar / dt = T log(1 - u(tT - 1/2)^2). At t = 1, a = 0.068 (not pure noise:
    LDM's schedule has nonzero terminal SNR). b' ~ 1/sqrt(t) at t = 0, hence t_min = T_EPS.
    eps_weight: w_t = -2 / lambda'_t (unweighted eps loss).
    """

    t_min: float = T_EPS
    beta_start: float = 0.00085
    beta_end: float = 0.012
    num_train_timesteps: int = 1000
    name: str = field(default="eps_linear", init=False)
    prediction: ClassVar[str] = "eps"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.beta_start < self.beta_end < 1.0 or self.num_train_timesteps < 2:
            raise ConfigError("eps_linear needs 0 < beta_start < beta_end < 1 and num_train_timesteps >= 2")

    def _u(self, j: Tensor) -> Tensor:
        c0, c1 = math.sqrt(self.beta_start), math.sqrt(self.beta_end)
        return c0 + j * (c1 - c0) / (self.num_train_timesteps - 1)

    @staticmethod
    def _g(u: Tensor) -> Tensor:
        return (1.0 + u) * torch.log1p(u) - (1.0 - u) * torch.log1p(-u) - 2.0 * u

    def log_alpha_bar(self, t: Tensor | float) -> tuple[Tensor, Tensor]:
        """(log alpha_bar(t), d/dt log alpha_bar(t)) in float64 (t not clamped here)."""
        t = _as_t(t)
        n = self.num_train_timesteps
        du = (math.sqrt(self.beta_end) - math.sqrt(self.beta_start)) / (n - 1)
        j = t * n - 0.5  # upper integration limit (continuous index s + 1/2 with s = tT - 1)
        j0 = torch.full_like(t, -0.5)
        log_ab = (self._g(self._u(j)) - self._g(self._u(j0))) / du
        return log_ab, n * torch.log1p(-self._u(j) ** 2)

    def _coeffs(self, t):
        log_ab, dlog = self.log_alpha_bar(t)
        ab = torch.exp(log_ab)
        a, b = torch.sqrt(ab), torch.sqrt(-torch.expm1(log_ab))
        return a, b, 0.5 * a * dlog, -0.5 * ab * dlog / b

    def target(self, x0, eps, t):
        return eps

    def _x0_eps(self, out, x_t, t):
        a, b, _, _ = self._coeffs(t)
        return (x_t - _bcast(b, x_t) * out) / _bcast(a, x_t), out

    def eps_weight(self, t):
        log_ab, dlog = self.log_alpha_bar(self.clamp(t))
        # lambda = log(ab / (1 - ab)) -> lambda' = dlog / (1 - ab); w = -2 / lambda'
        return -2.0 * (-torch.expm1(log_ab)) / dlog


@dataclass(frozen=True)
class VCosine(Path):
    """Cosine VP path with v-prediction (SD3 section 3.1 "Cosine"; Nichol & Dhariwal 2021 schedule,
    Salimans & Ho 2022 v-parameterisation):
        a_t = cos(pi t / 2), b_t = sin(pi t / 2),  target v = a_t eps - b_t x0,
        x0_hat = a x_t - b v,  eps_hat = b x_t + a v,  dx/dt = (pi/2)(a eps - b x0) = (pi/2) v.
    eps_weight: w_t = (2/pi) tan(pi t / 2) = (2/pi) e^{-lambda/2}, SD3's v-prediction cosine weighting
    e^{-lambda_t/2} up to a constant. No division, so no clamp (log_snr is +-inf at the endpoints).
    """

    name: str = field(default="v_cosine", init=False)
    prediction: ClassVar[str] = "v"

    def _coeffs(self, t):
        h = 0.5 * math.pi
        return torch.cos(h * t), torch.sin(h * t), -h * torch.sin(h * t), h * torch.cos(h * t)

    def target(self, x0, eps, t):
        a, b, _, _ = self.coeffs(t)
        return _bcast(a, x0) * eps - _bcast(b, x0) * x0

    def _x0_eps(self, out, x_t, t):
        a, b, _, _ = self._coeffs(t)
        a, b = _bcast(a, x_t), _bcast(b, x_t)
        return a * x_t - b * out, b * x_t + a * out

    def to_velocity(self, out, x_t, t):
        return 0.5 * math.pi * out

    def eps_weight(self, t):
        return torch.tan(0.5 * math.pi * self.clamp(t)) * (2.0 / math.pi)


@dataclass(frozen=True)
class EDM(Path):
    """EDM (Karras et al. 2022) as SD3 section 3.1 uses it, in VP-normalised form.

    Noise level from t by the log-normal quantile: sigma(t) = exp(P_m + P_s Phi^{-1}(t)) (SD3: b_t =
    exp F_N^{-1}(t | P_m, P_s^2); Karras' training defaults P_m = -1.2, P_s = 1.2, sigma_data = 0.5).
    EDM's variance-exploding x = x0 + sigma eps is stored divided by sqrt(1 + sigma^2), which keeps the same
    log-SNR (lambda = -2 log sigma) and makes x_t -> eps as t -> 1 like every other path:
        a_t = 1 / sqrt(1 + sigma^2),  b_t = sigma / sqrt(1 + sigma^2),  x_ve = x_t / a_t.
    F-prediction with EDM's preconditioning (Karras et al. 2022, table 1):
        c_skip = sd^2 / (sigma^2 + sd^2),  c_out = sigma sd / sqrt(sigma^2 + sd^2),
        c_in = 1 / sqrt(sigma^2 + sd^2),
        D(x_ve) = c_skip x_ve + c_out F(c_in x_ve),  target F = (x0 - c_skip x_ve) / c_out,
    and EDM's loss weight lambda(sigma) = 1 / c_out^2 makes the F-loss unweighted. model_input() returns
    c_in x_ve. eps_weight: w_t = (sigma^2 + sd^2) / sd^2 * phi(z) / P_s = 8 N(lambda | -2 P_m, (2 P_s)^2)
    (e^{-lambda} + 0.5^2) for sd = 0.5, i.e. SD3's w_t^EDM up to a constant. sigma' = sigma P_s / phi(z)
    diverges at both ends, hence the clamp [T_EPS, 1 - T_EPS] (sigma in [0.0018, 50] for the defaults).
    """

    t_min: float = T_EPS
    t_max: float = 1.0 - T_EPS
    p_mean: float = -1.2
    p_std: float = 1.2
    sigma_data: float = 0.5
    name: str = field(default="edm", init=False)
    prediction: ClassVar[str] = "edm_f"  # Karras' F, preconditioned

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (self.t_min > 0.0 and self.t_max < 1.0):
            raise ConfigError("edm needs 0 < t_min and t_max < 1 (sigma is 0 / infinite at the endpoints)")
        if self.p_std <= 0 or self.sigma_data <= 0:
            raise ConfigError(f"edm needs p_std > 0 and sigma_data > 0, got {self.p_std}, {self.sigma_data}")

    def _z(self, t: Tensor) -> Tensor:
        return math.sqrt(2.0) * torch.erfinv(2.0 * t - 1.0)  # Phi^{-1}(t)

    def sigma(self, t: Tensor | float) -> Tensor:
        return torch.exp(self.p_mean + self.p_std * self._z(self.clamp(t)))

    def _coeffs(self, t):
        z = self._z(t)
        s = torch.exp(self.p_mean + self.p_std * z)
        phi = torch.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
        ds = s * self.p_std / phi
        r = torch.rsqrt(1.0 + s * s)  # 1 / sqrt(1 + sigma^2)
        return r, s * r, -s * ds * r**3, ds * r**3

    def _precond(self, t: Tensor, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(sigma, c_skip, c_out, 1/a) broadcast against x, for clamped float64 t."""
        s = torch.exp(self.p_mean + self.p_std * self._z(t))
        sd2 = self.sigma_data**2
        c_skip = sd2 / (s * s + sd2)
        c_out = s * self.sigma_data / torch.sqrt(s * s + sd2)
        return tuple(_bcast(c, x) for c in (s, c_skip, c_out, torch.sqrt(1.0 + s * s)))

    def target(self, x0, eps, t):
        s, c_skip, c_out, _ = self._precond(self.clamp(t), x0)
        return (x0 - c_skip * (x0 + s * eps)) / c_out

    def _x0_eps(self, out, x_t, t):
        s, c_skip, c_out, inv_a = self._precond(t, x_t)
        x_ve = x_t * inv_a
        d = c_skip * x_ve + c_out * out
        return d, (x_ve - d) / s

    def model_input(self, x_t, t):
        tc = self.clamp(t)
        s = torch.exp(self.p_mean + self.p_std * self._z(tc))
        c = torch.sqrt((1.0 + s * s) / (s * s + self.sigma_data**2))  # c_in / a_t
        return x_t * _bcast(c, x_t)

    def eps_weight(self, t):
        z = self._z(self.clamp(t))
        s2 = torch.exp(2.0 * (self.p_mean + self.p_std * z))
        phi = torch.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
        return (s2 + self.sigma_data**2) / self.sigma_data**2 * phi / self.p_std


PATHS: dict[str, type[Path]] = {
    "rectified_flow": RectifiedFlow,
    "eps_linear": EpsLinear,
    "v_cosine": VCosine,
    "edm": EDM,
}


def get_path(name: str, **params) -> Path:
    """A path by name ("rectified_flow", "eps_linear", "v_cosine", "edm"), with optional dataclass params."""
    if name not in PATHS:
        raise ConfigError(f"unknown flow path {name!r}; choose one of {', '.join(sorted(PATHS))}")
    try:
        return PATHS[name](**params)
    except TypeError as e:
        raise ConfigError(f"bad parameters {sorted(params)} for path {name!r}: {e}") from None


def path_record(path: Path) -> dict[str, Any]:
    """What sampling needs to know about a trained model's path (JSON-able; stored in bundles):
    {"path": name, "params": its dataclass parameters, "prediction": what the network outputs,
    "timestep_input": the timestep convention the network was trained with}."""
    params = {f.name: getattr(path, f.name) for f in dataclasses.fields(path) if f.init}
    return {"path": path.name, "params": params, "prediction": path.prediction,
            "timestep_input": TIMESTEP_INPUT}


def path_from_record(record: Any, where: str = "flow") -> Path:
    """The path of a `path_record`; ConfigError (one line, prefixed by `where`) for a record without a path,
    an unknown path, bad parameters, or a prediction / timestep convention this rectiflow cannot sample."""
    if not isinstance(record, dict) or not isinstance(record.get("path"), str):
        raise ConfigError(f"{where} names no flow path (e.g. \"path\": \"rectified_flow\"): the network "
                          "output cannot be converted to a velocity without it; re-export the model")
    try:
        path = get_path(record["path"], **(record.get("params") or {}))
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    for key, want in (("prediction", path.prediction), ("timestep_input", TIMESTEP_INPUT)):
        if record.get(key, want) != want:
            raise ConfigError(f"{where}: path {path.name!r} has {key} {want!r}, the record says "
                              f"{record[key]!r}; re-export the model")
    return path


def t_from_log_snr(path: Path, lam: Tensor, iters: int = 64) -> Tensor:
    """Inverse of path.log_snr by vectorised bisection on [t_min, t_max] (lambda_t is decreasing in t).

    Values of lambda outside the path's clamped range map to the nearest endpoint. float64, like lam.
    """
    lam = _as_t(lam)
    lo = torch.full_like(lam, path.t_min)
    hi = torch.full_like(lam, path.t_max)
    for _ in range(iters):  # 64 halvings of an interval <= 1 reach float64 resolution
        mid = 0.5 * (lo + hi)
        above = path.log_snr(mid) > lam  # still too clean -> move right
        lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
    return 0.5 * (lo + hi)


def equivalent_rf_weight(path: Path, t: Tensor | float) -> Tensor:
    """Per-sample weight on the rectified-flow loss (uniform t) that reproduces `path`'s objective.

    SD3 (section 2) writes every objective as -1/2 E_t[w_t lambda'_t ||eps_hat - eps||^2]
    = 1/2 int w(lambda) ||eps_hat - eps||^2 dlambda, so training `path` with uniform t weights log-SNR lambda
    like RF with uniform t and weight w^path(lambda) / w^RF(lambda). Returns that ratio at the RF times t,
    whose log-SNR is lambda = 2 log((1 - t) / t); the path's time with the same lambda comes from bisection.
    (E.g. v_cosine gives the constant 2/pi: SD3's cosine-v weighting e^{-lambda/2} equals RF's t/(1-t).)
    """
    rf = RectifiedFlow()
    lam = rf.log_snr(t)
    return path.eps_weight(t_from_log_snr(path, lam)) / rf.eps_weight(t)


def training_pair(path: Path, x0: Tensor, eps: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """(x_t, target) for one training step; the loss is ||model(path.model_input(x_t, t), t) - target||^2."""
    return path.interpolate(x0, eps, t), path.target(x0, eps, t)


def velocity_fn_from_model(path: Path, model_fn: Callable[[Tensor, Tensor], Tensor]):
    """Wrap model_fn(net_input, t) -> network output into a solver velocity_fn(x, t) -> dx/dt for `path`."""

    def velocity_fn(x: Tensor, t: Tensor) -> Tensor:
        return path.to_velocity(model_fn(path.model_input(x, t), t), x, t)

    return velocity_fn
