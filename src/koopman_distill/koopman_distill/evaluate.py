"""Closed-loop evaluation in the simulated task and the distance of a student's chunks to the teacher's.

Rollouts: episode ``i`` uses task seed ``seed + i`` for every policy, so all policies face the same
start states (Gen3: targets and pillars; Push-T: agent and block poses). The metrics follow the task's
``result()``: Gen3 counts success, collision and the detour side, Push-T success (coverage > 0.95) and the
episode's maximum coverage. The policy replans every ``n_action_steps`` control steps; its noise comes from a
generator seeded per episode and is redrawn at every decision, as Diffusion Policy samples and as the ROS policy
node does (``noise_per='episode'`` holds it for the whole episode). A held noise makes a one-step or DDIM
policy a fixed map of the observation, which can park the hand or the disc where its own chunk says to stay:
the Push-T DDIM-10 teacher, task seeds 1000-1005, mean max coverage 0.15 with held noise, 0.41 redrawn, 0.51
for DDPM-100, whose intermediate noise is fresh anyway; the Gen3 oneflow student, seeds 1000-1099, success
0.92 held (all 8 failures stop 2.3-3.2 cm from the target, success is 2 cm) and 1.00 redrawn, with no
collision either way (redrawing does not flip detours into the pillar). Latency is the wall time of one batch-1
``predict_action`` call, or of one batched call when episodes run in lockstep (``rollout``'s ``batch``).

Camera policies run in the same loop under the same protocol: the env renders their camera at their frame size
after every control step (``images[i]`` shows the state of ``obs[i]``, as in their demonstrations), and they
get the observation columns their names select (the joint state), the frames beside them.

MMD: for ``n_obs`` observation histories drawn from the demonstrations, ``n_draws`` chunks from the policy
and from the teacher; squared MMD (unbiased) with a Gaussian kernel whose bandwidth is the median pairwise
distance of the teacher's chunks, in the teacher's normalised action space, averaged over observations.
The teacher against a second independent draw of itself gives the noise floor. Camera policies have none
(the MMD observations are state vectors, without the frames such a policy would need).

Reference policies (``REFERENCES``), rows that say what a score means when a policy does nothing useful:
``hold`` keeps the commanded position where it is (the Push-T disc, the Gen3 joints), ``random_target`` sends
it to a point drawn uniformly from the action space at every decision (the noise's first row through the
normal CDF, so the draw is the evaluation's seeded noise).

Modes: per start state, ``draws`` noises, each rolled out in closed loop (noise redrawn per decision) until
the policy commits to a mode: the side of the pillar the hand first crosses on Gen3, the face of the T the
disc first touches on Push-T (``none`` when it never does within the limit). Episode-level mode fractions
over 50-100 episodes move by about 0.1 between seed sets; the per-state fractions over many draws separate
a policy that picks one mode per state from one that keeps the teacher's mix, and their spread across states
is reported beside the mean. The distance to the teacher is per state, with the binomial sampling variance
of both estimates removed (``mode_summary``).
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from koopman_distill.runners import Runner
from koopman_policy.base import BasePolicy
from koopman_sim.pusht_expert import AGENT_RADIUS, T_OUTLINE


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
    first_modes: list[str] = field(default_factory=list)
    render_ms: list[float] = field(default_factory=list)  # camera policies: every frame rendered for them

    def record(self, result: Any, first_mode: str | None = None) -> None:
        """Add one episode's ``env.result()`` and, when tracked, the first mode it committed to."""
        self.successes.append(bool(result.success))
        if first_mode is not None:
            self.first_modes.append(first_mode)
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
        if self.first_modes:
            out["first_mode_fraction"] = {m: float(np.mean([f == m for f in self.first_modes]))
                                          for m in MODES[self.task]}
        out["latency_ms"] = {"p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99))}
        if self.render_ms:
            out["render_ms_per_frame"] = {"p50": float(np.percentile(self.render_ms, 50)),
                                          "p99": float(np.percentile(self.render_ms, 99))}
        return out


NOISE = {"gen3_reach_obstacle": "decision", "pusht": "decision"}

# The faces of the T (gym-pusht's block frame: the bar spans y in [0, 30], the stem y in [30, 120]), in
# T_OUTLINE's edge order, and each task's modes.
T_FACES = ("bar_back", "bar_end_right", "bar_under_right", "stem_right", "stem_tip", "stem_left",
           "bar_under_left", "bar_end_left")
MODES = {"gen3_reach_obstacle": ("left", "right", "none"), "pusht": (*T_FACES, "none")}
CONTACT_TOLERANCE = 0.5  # px beyond the disc's radius that still counts as touching the block


def pusht_contact_face(env: Any) -> str | None:
    """The face of the T the disc touches now (nearest outline edge in the block frame), or None."""
    inner = env.env
    p = np.asarray(inner.block.world_to_local(inner.agent.position), dtype=float)
    a, b = T_OUTLINE, np.roll(T_OUTLINE, -1, axis=0)
    t = np.clip(((p - a) * (b - a)).sum(1) / ((b - a) ** 2).sum(1), 0.0, 1.0)
    dist = np.linalg.norm(a + t[:, None] * (b - a) - p, axis=1)
    k = int(np.argmin(dist))
    return T_FACES[k] if dist[k] <= AGENT_RADIUS + CONTACT_TOLERANCE else None


def mode_now(task: str, env: Any, info: dict) -> str | None:
    """The mode a step has just committed to, or None: the Gen3 hand's first crossing of the pillar plane,
    the Push-T disc's first touch of the block."""
    if task == "pusht":
        return pusht_contact_face(env)
    return info.get("side")


@dataclass
class ReferenceRunner:
    """A model-free policy behind the ``Runner`` interface (``REFERENCES``; module docstring).

    The commanded quantity comes first in both tasks' observations (Push-T: the disc's position, Gen3: the
    joint positions), so ``hold`` repeats ``obs[-1, :action_dim]``.
    """

    name: str
    low: np.ndarray
    high: np.ndarray
    obs_dim: int
    horizon: int
    n_obs_steps: int
    n_action_steps: int
    obs_names: tuple[str, ...] = ()  # the task's observation, which rollouts select by name
    control_dt: float = 0.1
    method: str = "reference"
    backend: str = "none"
    num_parameters: int = 0
    card: None = None
    image_size: None = None
    camera: None = None
    sampler: None = None

    def __post_init__(self) -> None:
        if self.name not in REFERENCES:
            raise ValueError(f"unknown reference policy {self.name!r}; known: {', '.join(REFERENCES)}")
        self.action_dim = len(self.low)

    def predict_action(self, obs_history: np.ndarray, noise: np.ndarray) -> np.ndarray:
        obs, eps = np.asarray(obs_history, np.float32), np.asarray(noise, np.float32)
        if self.name == "hold":
            point = obs[..., -1, : self.action_dim]
        else:
            point = self.low + (self.high - self.low) * torch.special.ndtr(torch.from_numpy(eps[..., 0, :])).numpy()
        return np.repeat(point[..., None, :], self.horizon, axis=-2).astype(np.float32)


REFERENCES = ("hold", "random_target")


def reference_runner(name: str, task: str, like: Runner) -> ReferenceRunner:
    """Reference policy ``name`` for ``task`` with the chunk layout of ``like`` (the task's teacher)."""
    import koopman_sim

    env = koopman_sim.make(task)
    space = env.action_space
    env.close()
    return ReferenceRunner(name, np.asarray(space.low, np.float32), np.asarray(space.high, np.float32),
                           len(env.obs_names), like.horizon, like.n_obs_steps, like.n_action_steps,
                           tuple(env.obs_names), like.control_dt)


def make_env(task: str, runner: Runner) -> tuple[Any, np.ndarray]:
    """The task's env (rendering at a camera policy's frame size) and the env's observation columns the runner
    reads, by name; ValueError naming what the task does not observe."""
    import koopman_sim

    size = {"height": runner.image_size[0], "width": runner.image_size[1]} if runner.image_size else {}
    env = koopman_sim.make(task, **size)
    missing = [n for n in runner.obs_names if n not in env.obs_names]
    if missing:
        env.close()
        raise ValueError(f"{runner.name} observes {missing}, which task {task!r} does not (it gives "
                         f"{list(env.obs_names)})")
    return env, np.array([list(env.obs_names).index(n) for n in runner.obs_names], dtype=np.int64)


def render(env: Any, runner: Runner, stats: RolloutStats | None = None) -> np.ndarray:
    """A camera policy's frame of the env's current state, float32 in [0, 1]; timed into ``stats``."""
    t0 = time.perf_counter()
    frame = env.render_frame(camera=runner.camera)
    if stats is not None:
        stats.render_ms.append((time.perf_counter() - t0) * 1e3)
    return frame.astype(np.float32) / np.float32(255.0)


@dataclass
class _Episode:
    """One episode of a lockstep group: its env, noise stream, observation history and what it records."""

    env: Any
    rng: np.random.Generator
    noise: np.ndarray
    history: deque
    frames: deque | None
    path: list[np.ndarray]
    histories: list[np.ndarray] = field(default_factory=list)
    first: str | None = None
    done: bool = False

    def play(self, actions: np.ndarray, runner: Runner, task: str, cols: np.ndarray, stats: RolloutStats,
             keep_histories: bool) -> None:
        """Step the env through ``actions`` (the executed part of a chunk), stopping at the episode's end."""
        for action in actions:
            if keep_histories:
                self.histories.append(np.stack(self.history).astype(np.float32))
            obs, _, terminated, truncated, info = self.env.step(action)
            self.history.append(obs[cols])
            self.path.append(_tracked_point(task, self.env))
            self.first = self.first or mode_now(task, self.env, info)
            self.done = terminated or truncated
            if self.done:
                return
            if self.frames is not None:
                self.frames.append(render(self.env, runner, stats))


def rollout(runner: Runner, episodes: int, seed: int, task: str = "gen3_reach_obstacle",
            progress: bool = True, noise_per: str | None = None, keep_histories: bool = False,
            noise_scale: float = 1.0, batch: int = 1) -> RolloutStats:
    """Closed-loop episodes; ``noise_per`` ('episode' or 'decision') defaults to the task's ``NOISE``.

    ``noise_scale`` multiplies every noise draw the policy is given (a sampling temperature): a diagnosis of
    how much a student's closed loop depends on the spread of its chunks.

    ``keep_histories`` stores the observation history (the runner's columns) before every control step in
    ``stats.histories``, in episode order (not only at decisions: a policy that replans on another phase is
    queried there).

    ``batch`` episodes run in lockstep, one batched ``predict_action`` call per decision: the same start states
    and noises, a DDPM teacher's intermediate noise aside (drawn for the batch), and the latency recorded is
    then that of a batched call. The Push-T DDIM-30 teacher (its ONNX graph) costs 470 ms a call for 25 chunks
    against 34 ms for one, and scores the same in lockstep (0.655 on seeds 2000-2199) as one by one (0.654).
    """
    if batch < 1:
        raise ValueError(f"batch must be at least 1, got {batch}")
    noise_per = noise_per or NOISE.get(task, "episode")
    if noise_per not in ("episode", "decision"):
        raise ValueError(f"noise_per must be 'episode' or 'decision', got {noise_per!r}")
    if not (math.isfinite(noise_scale) and noise_scale > 0):
        raise ValueError(f"noise_scale must be a positive number, got {noise_scale!r}")
    made = [make_env(task, runner) for _ in range(min(batch, max(episodes, 1)))]  # one checks the columns
    envs, cols = [env for env, _ in made], made[0][1]
    stats = RolloutStats(task=task)
    start = runner.n_obs_steps - 1
    shape = (runner.horizon, runner.action_dim)

    def begin(env: Any, episode_seed: int) -> _Episode:
        obs, _ = env.reset(seed=episode_seed)
        rng = np.random.default_rng(episode_seed)
        frames = deque([render(env, runner, stats)] * runner.n_obs_steps, maxlen=runner.n_obs_steps) \
            if runner.image_size else None
        return _Episode(env, rng, rng.standard_normal(shape).astype(np.float32),
                        deque([obs[cols]] * runner.n_obs_steps, maxlen=runner.n_obs_steps), frames,
                        [_tracked_point(task, env)])

    with tqdm(total=episodes, desc=runner.name, disable=not progress, dynamic_ncols=True) as bar:
        for group_start in range(0, episodes, batch):
            group = [begin(env, seed + group_start + k) for k, env in enumerate(envs[: episodes - group_start])]
            while live := [ep for ep in group if not ep.done]:
                observation = (np.stack([np.stack(ep.history) for ep in live]).astype(np.float32),)
                if runner.image_size:
                    observation = (np.stack([np.stack(ep.frames) for ep in live]), *observation)
                noise = np.stack([ep.noise for ep in live]) * np.float32(noise_scale)
                t0 = time.perf_counter()
                chunks = runner.predict_action(*observation, noise)
                stats.latencies_ms.append((time.perf_counter() - t0) * 1e3)
                for ep, chunk in zip(live, chunks, strict=True):
                    if noise_per == "decision":
                        ep.noise = ep.rng.standard_normal(shape).astype(np.float32)
                    ep.play(chunk[start : start + runner.n_action_steps], runner, task, cols, stats,
                            keep_histories)
            for ep in group:
                stats.record(ep.env.result(), ep.first or "none")
                stats.paths.append(np.asarray(ep.path))
                stats.histories.extend(ep.histories)
            bar.update(len(group))
    for env in envs:
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


def mode_counts(runner: Runner, task: str, states: int, draws: int, seed: int, max_steps: int | None = None,
                progress: bool = True) -> np.ndarray:
    """Counts ``(states, len(MODES[task]))``: for start state ``i`` (task seed ``seed + i``), ``draws``
    closed-loop rollouts in lockstep (one batched call per decision), each until it commits to a mode
    (``mode_now``), ends, or reaches ``max_steps`` control steps. The noises depend on the state and the draw
    only, so every policy sees the same ones."""
    modes = MODES[task]
    made = [make_env(task, runner) for _ in range(draws)]
    envs, cols = [env for env, _ in made], made[0][1]
    start, shape = runner.n_obs_steps - 1, (draws, runner.horizon, runner.action_dim)
    counts = np.zeros((states, len(modes)), dtype=np.int64)
    torch.manual_seed(seed)  # a DDPM teacher's intermediate noise
    for i in tqdm(range(states), desc=f"{runner.name} modes", disable=not progress, dynamic_ncols=True):
        first = [env.reset(seed=seed + i)[0][cols] for env in envs]
        hist = np.stack([[o] * runner.n_obs_steps for o in first]).astype(np.float32)
        frames = np.stack([[render(env, runner)] * runner.n_obs_steps for env in envs]) if runner.image_size \
            else None
        found: list[str | None] = [None] * draws
        active = np.ones(draws, dtype=bool)
        rng = np.random.default_rng([seed, i])
        steps = 0
        while active.any() and (max_steps is None or steps < max_steps):
            noise = rng.standard_normal(shape).astype(np.float32)
            idx = np.flatnonzero(active)
            observation = (hist[idx],) if frames is None else (frames[idx], hist[idx])
            chunks = runner.predict_action(*observation, noise[idx])
            for j, chunk in zip(idx, chunks, strict=True):
                for action in chunk[start : start + runner.n_action_steps]:
                    obs, _, terminated, truncated, info = envs[j].step(action)
                    hist[j] = np.roll(hist[j], -1, axis=0)
                    hist[j, -1] = obs[cols]
                    found[j] = mode_now(task, envs[j], info)
                    if found[j] is not None or terminated or truncated:
                        active[j] = False
                        break
                    if frames is not None:
                        frames[j] = np.roll(frames[j], -1, axis=0)
                        frames[j, -1] = render(envs[j], runner)
            steps += runner.n_action_steps
        for m in found:
            counts[i, modes.index(m or "none")] += 1
    for env in envs:
        env.close()
    return counts


def mode_summary(counts: np.ndarray, modes: tuple[str, ...], reference: np.ndarray | None = None
                 ) -> dict[str, Any]:
    """Mean per-state fraction of each mode with its spread across states (sd) and the standard error of
    the mean; against ``reference`` counts of the same states (the teacher's), the per-state RMS difference
    of each mode's fraction with the sampling noise of both estimates removed:
    ``sqrt(mean((p - q)^2 - p(1 - p)/(n - 1) - q(1 - q)/(m - 1)))``, 0 when the noise explains it all."""
    n = counts.sum(1, keepdims=True)
    frac = counts / n
    states = len(counts)
    out: dict[str, Any] = {
        "states": states, "draws": int(n[0, 0]),
        "fraction": {m: float(frac[:, k].mean()) for k, m in enumerate(modes)},
        "fraction_sd_across_states": {m: float(frac[:, k].std(ddof=1)) if states > 1 else 0.0
                                      for k, m in enumerate(modes)},
    }
    out["fraction_se"] = {m: v / np.sqrt(states) for m, v in out["fraction_sd_across_states"].items()}
    if reference is not None:
        m_ = reference.sum(1, keepdims=True)
        q = reference / m_
        sq = (frac - q) ** 2 - frac * (1 - frac) / np.maximum(n - 1, 1) - q * (1 - q) / np.maximum(m_ - 1, 1)
        out["rms_diff_to_reference"] = {m: float(np.sqrt(max(0.0, sq[:, k].mean()))) for k, m in enumerate(modes)}
        out["mean_abs_diff_to_reference_raw"] = {m: float(np.abs(frac[:, k] - q[:, k]).mean())
                                                 for k, m in enumerate(modes)}
    return out
