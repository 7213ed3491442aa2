"""Closed-loop evaluation in the simulated task and the distance of a student's chunks to the teacher's.

Rollouts: episode ``i`` uses task seed ``seed + i`` for every policy, so all policies face the same
start states (Gen3: targets and pillars; Push-T: agent and block poses). The metrics follow the task's
``result()``: Gen3 counts success, collision and the detour side, Push-T success (coverage > 0.95) and the
episode's maximum coverage. The policy replans every ``n_action_steps`` control steps; its noise comes from a generator
seeded per episode and is redrawn at every decision, as Diffusion Policy samples and as the ROS policy node
does (``noise_per='episode'`` holds it for the whole episode). A held noise makes a one-step or DDIM
policy a fixed map of the observation, which can park the hand or the disc where its own chunk says to stay:
the Push-T DDIM-10 teacher, task seeds 1000-1005, mean max coverage 0.15 with held noise, 0.41 redrawn, 0.51
for DDPM-100, whose intermediate noise is fresh anyway; the Gen3 oneflow student, seeds 1000-1099, success
0.92 held (all 8 failures stop 2.3-3.2 cm from the target, success is 2 cm) and 1.00 redrawn, with no
collision either way (redrawing does not flip detours into the pillar). Latency is the wall time of one batch-1
``predict_action`` call.

MMD: for ``n_obs`` observation histories drawn from the demonstrations, ``n_draws`` chunks from the policy
and from the teacher; squared MMD (unbiased) with a Gaussian kernel whose bandwidth is the median pairwise
distance of the teacher's chunks, in the teacher's normalised action space, averaged over observations.
The teacher against a second independent draw of itself gives the noise floor.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from koopman_distill.runners import Runner
from koopman_policy.base import BasePolicy


def _tracked_point(task: str, env: Any) -> np.ndarray:
    """What the path plot follows: the Gen3 hand, or the Push-T disc."""
    if task == "pusht":
        return np.asarray(env.env.agent.position, dtype=float)
    return env.arm.ee_pos.copy()


@dataclass
class RolloutStats:
    task: str = "gen3_reach_obstacle"
    successes: list[bool] = field(default_factory=list)
    collisions: list[bool] = field(default_factory=list)
    sides: list[str | None] = field(default_factory=list)
    coverages: list[float] = field(default_factory=list)
    latencies_ms: list[float] = field(default_factory=list)
    paths: list[np.ndarray] = field(default_factory=list)
    histories: list[np.ndarray] = field(default_factory=list)
    scenes: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)

    def record(self, result: Any) -> None:
        """Add one episode's ``env.result()``."""
        self.successes.append(bool(result.success))
        if self.task == "pusht":
            self.coverages.append(float(result.coverage))
        else:
            self.collisions.append(bool(result.collision))
            self.sides.append(result.side)
            self.scenes.append((np.asarray(result.target), np.asarray(result.pillar)))

    def summary(self) -> dict[str, float | int | None]:
        n = len(self.successes)
        lat = np.asarray(self.latencies_ms) if self.latencies_ms else np.full(1, np.nan)
        out: dict[str, Any] = {"episodes": n, "success_rate": float(np.mean(self.successes)) if n else 0.0}
        if self.task == "pusht":
            out["mean_coverage"] = float(np.mean(self.coverages)) if n else 0.0
        else:
            sided = [s for s in self.sides if s is not None]
            out["collision_rate"] = float(np.mean(self.collisions)) if n else 0.0
            out["left_fraction"] = float(np.mean([s == "left" for s in sided])) if sided else None
        out["latency_ms"] = {"p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99))}
        return out


NOISE = {"gen3_reach_obstacle": "decision", "pusht": "decision"}


def rollout(runner: Runner, episodes: int, seed: int, task: str = "gen3_reach_obstacle",
            progress: bool = True, noise_per: str | None = None, keep_histories: bool = False) -> RolloutStats:
    """Closed-loop episodes; ``noise_per`` ('episode' or 'decision') defaults to the task's ``NOISE``.

    ``keep_histories`` stores the observation history before every control step in ``stats.histories``
    (not only at decisions: a policy that replans on another phase is queried there).
    """
    import koopman_sim

    env = koopman_sim.make(task)
    if len(env.obs_names) != runner.obs_dim:
        raise ValueError(f"{runner.name} takes {runner.obs_dim}-d observations, task {task!r} gives "
                         f"{len(env.obs_names)}-d ones")
    noise_per = noise_per or NOISE.get(task, "episode")
    if noise_per not in ("episode", "decision"):
        raise ValueError(f"noise_per must be 'episode' or 'decision', got {noise_per!r}")
    stats = RolloutStats(task=task)
    start = runner.n_obs_steps - 1
    shape = (runner.horizon, runner.action_dim)
    for ep in tqdm(range(episodes), desc=runner.name, disable=not progress, dynamic_ncols=True):
        obs, _ = env.reset(seed=seed + ep)
        rng = np.random.default_rng(seed + ep)
        noise = rng.standard_normal(shape).astype(np.float32)
        history = deque([obs] * runner.n_obs_steps, maxlen=runner.n_obs_steps)
        path = [_tracked_point(task, env)]
        done = False
        while not done:
            t0 = time.perf_counter()
            chunk = runner.predict_action(np.stack(history).astype(np.float32), noise)
            stats.latencies_ms.append((time.perf_counter() - t0) * 1e3)
            if noise_per == "decision":
                noise = rng.standard_normal(shape).astype(np.float32)
            for action in chunk[start : start + runner.n_action_steps]:
                if keep_histories:
                    stats.histories.append(np.stack(history).astype(np.float32))
                obs, _, terminated, truncated, _ = env.step(action)
                history.append(obs)
                path.append(_tracked_point(task, env))
                done = terminated or truncated
                if done:
                    break
        stats.record(env.result())
        stats.paths.append(np.asarray(path))
    env.close()
    return stats


def _mmd2_unbiased(x: torch.Tensor, y: torch.Tensor, bandwidth: torch.Tensor) -> torch.Tensor:
    """Batched over the leading dimension: x, y are (M, N, D); bandwidth (M,)."""
    n = x.shape[1]
    gamma = 1.0 / (2.0 * bandwidth.pow(2)).view(-1, 1, 1)

    def k(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.exp(-gamma * torch.cdist(a, b).pow(2))

    off = 1.0 - torch.eye(n)
    kxx = (k(x, x) * off).sum((1, 2)) / (n * (n - 1))
    kyy = (k(y, y) * off).sum((1, 2)) / (n * (n - 1))
    kxy = k(x, y).mean((1, 2))
    return kxx + kyy - 2 * kxy


@torch.no_grad()
def teacher_reference(teacher: BasePolicy, obs: torch.Tensor, n_draws: int, seed: int) -> torch.Tensor:
    """Normalised teacher chunks ``(M, n_draws, H*Da)`` for observation histories ``(M, To, Do)``."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # DDPM's intermediate noise
    reps = obs.repeat_interleave(n_draws, 0)
    chunks = teacher.predict_action(reps, teacher.sample_noise(len(reps), gen))
    return teacher.action_normalizer.normalize(chunks).reshape(len(obs), n_draws, -1)


def mmd_to_teacher(runner: Runner, teacher: BasePolicy, obs: torch.Tensor, reference: torch.Tensor,
                   seed: int) -> float:
    m, n = reference.shape[:2]
    rng = np.random.default_rng(seed)
    reps = obs.repeat_interleave(n, 0).numpy()
    noise = rng.standard_normal((len(reps), runner.horizon, runner.action_dim)).astype(np.float32)
    chunks = torch.from_numpy(np.asarray(runner.predict_action(reps, noise)))
    samples = teacher.action_normalizer.normalize(chunks).reshape(m, n, -1)
    flat = reference
    bandwidth = torch.cdist(flat, flat).flatten(1).median(dim=1).values.clamp_min(1e-3)
    return float(_mmd2_unbiased(samples, reference, bandwidth).mean())
