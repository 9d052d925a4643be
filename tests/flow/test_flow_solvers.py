"""Solvers: convergence order on ODEs with known solutions, NFE, adaptive tolerance, callbacks, errors."""

import math

import pytest
import torch

from rectiflow.errors import ConfigError, RectiflowError
from rectiflow.flow import linear_grid, solve, solve_adaptive, solver_nfe, timestep_grid

ORDERS = {"euler": 1, "midpoint": 2, "heun": 2, "rk4": 4}
MU0, S0 = 0.7, 0.4  # data N(MU0, S0^2), noise N(0, 1)


def gaussian_rf_velocity(x, t):
    """Exact RF marginal velocity between N(MU0, S0^2) (t=0) and N(0, 1) (t=1), per dimension.

    The flow maps quantiles: x_t = m_t + std_t z with m_t = (1 - t) MU0, std_t = sqrt((1-t)^2 S0^2 + t^2),
    so v = m'_t + std'_t / std_t (x - m_t); it is non-autonomous and nonlinear in t.
    """
    t = t.item()
    m, dm = (1 - t) * MU0, -MU0
    var = (1 - t) ** 2 * S0**2 + t**2
    dstd = (-(1 - t) * S0**2 + t) / math.sqrt(var)
    return dm + dstd / math.sqrt(var) * (x - m)


def _x1():
    return torch.randn(8, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def _exact(x1):
    return MU0 + S0 * x1  # z = x1 at t = 1 (m_1 = 0, std_1 = 1)


def _observed_orders(f, x1, exact, method, shift=None, steps=(16, 32, 64)):
    errs = [(solve(f, x1, timestep_grid(n, shift=shift), method) - exact).abs().max().item() for n in steps]
    return [math.log2(coarse / fine) for coarse, fine in zip(errs[:-1], errs[1:])], errs


@pytest.mark.parametrize("method", sorted(ORDERS))
def test_convergence_order_nonlinear_ode(method):
    """dx/dt = x^2 from t = 1 to 0: x(0) = 1 / (1/x(1) + 1). Halving the step divides the error by 2^order."""
    x1 = 0.5 + torch.rand(8, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    orders, errs = _observed_orders(lambda x, t: x * x, x1, 1 / (1 / x1 + 1), method)
    for observed in orders:
        assert abs(observed - ORDERS[method]) < 0.15, (method, errs)


@pytest.mark.parametrize("method", sorted(ORDERS))
@pytest.mark.parametrize("shift", [None, 3.0])
def test_convergence_order_linear_ode(method, shift):
    """dx/dt = a x from t = 1 to 0: x(0) = x(1) e^{-a}; on the linear and on a shifted (non-uniform) grid."""
    a, x1 = 1.5, _x1()
    orders, errs = _observed_orders(lambda x, t: a * x, x1, x1 * math.exp(-a), method, shift)
    for observed in orders:
        assert abs(observed - ORDERS[method]) < 0.15, (method, shift, errs)


@pytest.mark.parametrize("method", sorted(ORDERS))
def test_gaussian_rf_path_accuracy(method):
    """The exact RF marginal field between two Gaussians (non-autonomous). Its leading error terms partly
    cancel for midpoint (observed order 3) and rk4 (erratic, 3-6): check accuracy, and order >= p for the
    others."""
    x1 = _x1()
    orders, errs = _observed_orders(gaussian_rf_velocity, x1, _exact(x1), method)
    if method != "rk4":
        assert min(orders) > ORDERS[method] - 0.15, (method, errs)
    assert errs[-1] < {"euler": 5e-2, "midpoint": 5e-6, "heun": 2e-3, "rk4": 5e-9}[method], errs


@pytest.mark.parametrize("method", sorted(ORDERS))
@pytest.mark.parametrize("grid", [linear_grid(5), linear_grid(5, t_last=0.01)[:-1]])
def test_nfe_count_and_time_argument(method, grid):
    seen = []

    def f(x, t):
        assert t.ndim == 0 and t.dtype == torch.float32 and t.device == x.device
        seen.append(t.item())
        return -x

    x = torch.ones(2, 4)
    out = solve(f, x, grid, method)
    assert out.dtype == torch.float32
    assert len(seen) == solver_nfe(method, grid)
    n = len(grid) - 1
    expect = {"euler": n, "midpoint": 2 * n, "heun": 2 * n - int(grid[-1] == 0), "rk4": 4 * n}[method]
    assert solver_nfe(method, grid) == expect
    assert max(seen) == 1.0 and min(seen) >= grid[-1].item() - 1e-7


def test_float64_state_gets_float64_time():
    ts = []
    solve(lambda x, t: ts.append(t.dtype) or x, torch.ones(1, dtype=torch.float64), linear_grid(2))
    assert ts == [torch.float64, torch.float64]


def test_callback_and_progress():
    calls = []
    grid = timestep_grid(4, shift=3.0)
    cb = lambda i, t, x: calls.append((i, t))  # noqa: E731
    solve(lambda x, t: -x, torch.ones(3), grid, "heun", callback=cb, progress=True)
    assert [c[0] for c in calls] == [0, 1, 2, 3]
    assert [c[1] for c in calls] == pytest.approx(grid[1:].tolist())


def test_integrates_forward_too():
    """Inversion: the same solver from t = 0 to 1 undoes sampling (rk4, fine grid)."""
    x1 = _x1()
    x0 = solve(gaussian_rf_velocity, x1, linear_grid(64), "rk4")
    back = solve(gaussian_rf_velocity, x0, linear_grid(64).flip(0), "rk4")
    assert torch.allclose(back, x1, atol=1e-8)


@pytest.mark.parametrize("tol", [1e-4, 1e-7])
def test_adaptive_hits_its_tolerance(tol):
    x1 = _x1()
    calls = []

    def f(x, t):
        calls.append(1)
        return gaussian_rf_velocity(x, t)

    x, nfe = solve_adaptive(f, x1, rtol=tol, atol=tol)
    assert nfe == len(calls)
    err = (x - _exact(x1)).abs().max().item()
    assert err < 10 * tol, err  # global error within a small multiple of the local tolerance


def test_adaptive_tighter_tolerance_costs_more_and_is_more_accurate():
    x1 = _x1()
    x_a, n_a = solve_adaptive(gaussian_rf_velocity, x1, rtol=1e-3, atol=1e-3)
    x_b, n_b = solve_adaptive(gaussian_rf_velocity, x1, rtol=1e-8, atol=1e-8)
    assert n_b > n_a
    assert (x_b - _exact(x1)).abs().max() < (x_a - _exact(x1)).abs().max()
    # fast decay dx/dt = 20 x (x shrinks by e^-20): with atol below the final scale, relative accuracy holds
    x, _ = solve_adaptive(lambda x, t: 20.0 * x, x1, rtol=1e-8, atol=1e-14)
    assert torch.allclose(x, x1 * math.exp(-20.0), rtol=1e-5, atol=0)


def test_adaptive_edge_cases():
    x1 = _x1()
    assert solve_adaptive(gaussian_rf_velocity, x1, 0.5, 0.5) == (x1, 0)
    with pytest.raises(RectiflowError, match="max_steps"):
        solve_adaptive(gaussian_rf_velocity, x1, rtol=1e-12, atol=1e-12, max_steps=3)
    with pytest.raises(RectiflowError, match="non-finite"):
        solve_adaptive(lambda x, t: x * float("nan"), x1)
    with pytest.raises(ConfigError, match="rtol"):
        solve_adaptive(gaussian_rf_velocity, x1, rtol=0, atol=0)


def test_bad_inputs():
    x = torch.ones(2)
    f = lambda x, t: x  # noqa: E731
    with pytest.raises(ConfigError, match="unknown solver"):
        solve(f, x, linear_grid(4), "dpm++")
    with pytest.raises(ConfigError, match="monotone"):
        solve(f, x, [1.0, 0.5, 0.7, 0.0])
    with pytest.raises(ConfigError, match="at least 2"):
        solve(f, x, [1.0])
    with pytest.raises(ConfigError, match="unknown solver"):
        solver_nfe("dpm++", linear_grid(4))
