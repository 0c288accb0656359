"""ODE transfer: a damped oscillator whose stiffness and damping change between source and target.

    x'' + 2ζω x' + ω² x = 0,   x(0) = x0,  x'(0) = v0

The network maps (x0, v0, t) to x(t), t ∈ [0, 5]. Source: ω = 2.0, ζ = 0.10; target: ω = 2.4,
ζ = 0.20 (shifted parameters, as the PAC-Net paper's ODE tasks). Data come from a fixed-step
4th-order Runge–Kutta solver (dt = 0.01), checked against the closed-form solution at start-up.
Source: 400 trajectories; target: ``--target-trajectories`` (default 4 and 16); test: 100 each;
25 random times per trajectory. MLP 3-64-64-1 (tanh). Metric: RMSE of x(t).

    python benchmarks/pac_net/ode.py --seeds 3
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from common import Budget, Problem, mlp, rmse, run_methods, summarize, table, train  # noqa: E402

T_END, DT, TIMES_PER_TRAJECTORY = 5.0, 0.01, 25
SOURCE, TARGET = (2.0, 0.10), (2.4, 0.20)  # (ω, ζ)


def rk4_trajectories(x0: torch.Tensor, v0: torch.Tensor, omega: float, zeta: float) -> torch.Tensor:
    """x(t) on the grid 0, dt, ..., T_END for every initial condition, shape (N, steps + 1)."""
    def f(state):
        x, v = state
        return torch.stack([v, -(omega**2) * x - 2 * zeta * omega * v])

    state = torch.stack([x0, v0]).double()
    xs = [state[0]]
    for _ in range(round(T_END / DT)):
        k1 = f(state)
        k2 = f(state + DT / 2 * k1)
        k3 = f(state + DT / 2 * k2)
        k4 = f(state + DT * k3)
        state = state + DT / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        xs.append(state[0])
    return torch.stack(xs, dim=1)


def closed_form(x0, v0, t, omega, zeta):
    """Underdamped solution, used only to check the solver."""
    wd = omega * math.sqrt(1 - zeta**2)
    return torch.exp(-zeta * omega * t) * (x0 * torch.cos(wd * t) + (v0 + zeta * omega * x0) / wd * torch.sin(wd * t))


def check_solver() -> None:
    x0, v0 = torch.tensor([1.0, -0.5]), torch.tensor([0.0, 1.0])
    grid = torch.arange(round(T_END / DT) + 1, dtype=torch.float64) * DT
    for omega, zeta in (SOURCE, TARGET):
        exact = closed_form(x0[:, None].double(), v0[:, None].double(), grid, omega, zeta)
        err = (rk4_trajectories(x0, v0, omega, zeta) - exact).abs().max().item()
        assert err < 1e-7, f"RK4 disagrees with the closed form by {err}"


def sample(n_traj: int, params, gen: torch.Generator):
    x0 = torch.rand(n_traj, generator=gen) * 2 - 1
    v0 = torch.rand(n_traj, generator=gen) * 2 - 1
    traj = rk4_trajectories(x0, v0, *params)
    idx = torch.randint(0, traj.shape[1], (n_traj, TIMES_PER_TRAJECTORY), generator=gen)
    t = idx.double() * DT
    x = torch.stack([x0[:, None].expand_as(t), v0[:, None].expand_as(t), t / T_END], dim=-1).reshape(-1, 3)
    return x.float(), traj.gather(1, idx).reshape(-1).float()


def make_problems(seed: int, target_trajectories) -> dict[int, Problem]:
    gen = torch.Generator().manual_seed(seed)
    src_train, src_test = sample(400, SOURCE, gen), sample(100, SOURCE, gen)
    tgt_test = sample(100, TARGET, gen)
    torch.manual_seed(seed)
    model = mlp(3, 64, 1, act=nn.Tanh)
    loss = lambda out, y: F.mse_loss(out.squeeze(-1), y)  # noqa: E731
    train(model, *src_train, loss, steps=3000, lr=3e-3, batch_size=128, seed=seed)
    return {n: Problem(model, src_train, src_test, sample(n, TARGET, gen), tgt_test, loss, rmse, head_name="4")
            for n in target_trajectories}


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--target-trajectories", type=int, nargs="+", default=[4, 16])
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    check_solver()
    budget = Budget(target_steps=400, target_lr=1e-3, allocate_steps=800, allocate_lr=1e-3, batch_size=64)
    problems = [make_problems(s, args.target_trajectories) for s in range(args.seeds)]
    out = []
    for n in args.target_trajectories:
        runs = [run_methods(problems[s][n], budget, s, prune_fractions=(0.5, 0.8)) for s in range(args.seeds)]
        out.append(table(f"Damped oscillator, {n} target trajectories ({n * TIMES_PER_TRAJECTORY} samples; "
                         f"RMSE of x(t), lower is better; {args.seeds} seeds)", summarize(runs), "RMSE", digits=4))
        print(out[-1], flush=True)
    return "\n".join(out)


if __name__ == "__main__":
    main()
