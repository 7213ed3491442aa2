"""Headless simulation speed: how many simulated seconds per wall-clock second on one core."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import mujoco

from koopman_sim import make
from koopman_sim.arm import Gen3Arm
from koopman_sim.collect import expert_rng
from koopman_sim.expert import ScriptedExpert

__all__ = ["realtime_factor", "write_benchmark"]


def realtime_factor(
    seconds: float = 20.0, task: str = "gen3_reach_obstacle", seed: int = 0
) -> dict[str, Any]:
    """Measure real-time factors for ~``seconds`` of simulated time.

    ``realtime_factor``: env.step (50 physics steps + collision/side scoring after each) driven by the
    scripted expert, excluding the expert's once-per-episode planning; ``realtime_factor_with_expert``
    includes it; ``realtime_factor_physics_only``: bare Gen3Arm.step.
    """
    env = make(task)
    expert = ScriptedExpert(control_dt=env.control_dt)
    sim = wall_env = wall_total = 0.0
    ep = 0
    while sim < seconds:
        t0 = time.perf_counter()
        obs, _ = env.reset(seed=seed + ep)
        expert.reset(obs, expert_rng(seed + ep))
        done = False
        while not done:
            act = expert.act(obs)
            t1 = time.perf_counter()
            obs, _, term, trunc, _ = env.step(act)
            wall_env += time.perf_counter() - t1
            done = term or trunc
        wall_total += time.perf_counter() - t0
        sim += env.task.elapsed
        ep += 1
    env.close()

    arm = Gen3Arm()
    n = int(seconds / arm.physics_dt)
    t0 = time.perf_counter()
    arm.step(n)
    wall_phys = time.perf_counter() - t0
    return {
        "task": task,
        "episodes": ep,
        "sim_seconds": sim,
        "wall_seconds_env": wall_env,
        "realtime_factor": sim / wall_env,
        "realtime_factor_with_expert": sim / wall_total,
        "realtime_factor_physics_only": n * arm.physics_dt / wall_phys,
        "physics_dt": arm.physics_dt,
        "mujoco_version": mujoco.__version__,
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": 1,
    }


def write_benchmark(out: str | Path, seconds: float = 20.0) -> dict[str, Any]:
    result = realtime_factor(seconds)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result
