"""Running a task's scripted expert in its environment and collecting demonstration datasets.

Every dataset records the task's observation and action contract (its task file, ``tasks/<task>.yaml``, as
JSON). With a camera, each control step also gets a frame of that scene camera at the policy's own resolution
(no resize separates training from serving): ``images[i]`` is rendered right after the physics state of
``obs[i]``, as in closed loop, and the contract gains the camera's image feature.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from koopman_sim import check_task, make, task_file
from koopman_sim.dataset import side_code, write_dataset
from koopman_sim.expert import ScriptedExpert
from koopman_sim.pusht_expert import PushTExpert
from koopman_sim.tasks.pusht import PushTResult
from koopman_sim.tasks.reach_obstacle import EpisodeResult

__all__ = ["CAMERA_TOPIC", "EpisodeRecord", "check_camera", "collect", "episode_side", "expert_rng", "make_expert",
           "recorded_contract", "run_episode", "summarize"]

Expert = ScriptedExpert | PushTExpert
#: The topic the sim node publishes its camera on (``koopman_policy.contract.CAMERA_TOPIC``).
CAMERA_TOPIC = "camera/image_raw"


def recorded_contract(task: str, camera: str | None = None,
                      image_size: tuple[int, int] | None = None) -> dict[str, Any]:
    """The contract a collection records: the task's (its task file), with a camera the image feature of its
    frames."""
    import yaml

    contract = yaml.safe_load(task_file(task).read_text())
    if camera is not None and image_size is not None:
        contract["observation"].append({"name": "image", "kind": "image", "topic": CAMERA_TOPIC, "image": {
            "height": int(image_size[0]), "width": int(image_size[1]), "camera": camera}})
    return contract


def check_camera(env: Any, camera: str) -> None:
    """ValueError naming the scene's cameras unless ``camera`` is one of them."""
    import mujoco

    model = getattr(getattr(env, "arm", None), "model", None)
    if model is None:
        raise ValueError(f"{type(env).__name__} has no named scene cameras to render {camera!r} from")
    if mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_CAMERA, camera) < 0:
        names = [mujoco.mj_id2name(model, mujoco.mjtObj.mjOBJ_CAMERA, i) for i in range(model.ncam)]
        raise ValueError(f"unknown camera {camera!r}; the scene has {', '.join(map(str, names))}")


def make_expert(task: str, env: Any, model_path: str | None = None) -> Expert:
    """The scripted expert of ``task`` (the Gen3 detour planner or the Push-T pusher)."""
    if check_task(task) == "pusht":
        return PushTExpert()
    return ScriptedExpert(model_path=model_path, control_dt=env.control_dt)


def expert_rng(seed: int) -> np.random.Generator:
    """The expert's random stream for an episode: independent of, but reproducible from, the env seed."""
    return np.random.default_rng([int(seed), 1])


def episode_side(seed: int) -> str:
    """Detour side for the episode with env seed ``seed``: antithetic pairs of fair coin flips.

    Seeds 2k and 2k+1 share one fair coin and take opposite sides, so every episode is left or right with
    probability 1/2 (and reproducible from its own seed), while any run over consecutive seeds is balanced to
    within one episode. Independent flips would leave a 100-episode dataset 40/60 or worse a few % of the
    time, which a bimodal policy would learn as a preference.
    """
    seed = int(seed)
    coin = np.random.default_rng([seed // 2, 2]).random() < 0.5
    return "left" if coin != bool(seed % 2) else "right"


@dataclass
class EpisodeRecord:
    seed: int
    obs: np.ndarray
    action: np.ndarray
    result: EpisodeResult | PushTResult
    frames: list[np.ndarray] = field(default_factory=list)

    @property
    def steps(self) -> int:
        return len(self.action)


def run_episode(
    env: Any,
    expert: Expert,
    seed: int,
    on_step: Callable[[int, dict], None] | None = None,
    frame_every: int | None = None,
    balanced_sides: bool = True,
    camera: str | None = None,
) -> EpisodeRecord:
    """One expert episode; ``on_step(step, info)`` is called after each control step (live status).

    ``frame_every`` renders a frame at the start and every that many steps (from ``camera``, else the env's
    default view).

    With ``balanced_sides`` the Gen3 expert's side comes from ``episode_side(seed)``; otherwise it flips its own
    coin (the Push-T expert has no side to choose).
    """
    obs, info = env.reset(seed=int(seed))
    if isinstance(expert, ScriptedExpert):
        expert.reset(obs, expert_rng(seed), side=episode_side(seed) if balanced_sides else None)
    else:
        expert.reset(obs, expert_rng(seed))
    observations, actions, frames = [], [], []

    def render() -> np.ndarray:
        return env.render_frame(camera=camera) if camera is not None else env.render_frame()

    if frame_every:
        frames.append(render())
    step = 0
    while True:
        act = expert.act(obs)
        observations.append(obs)
        actions.append(act)
        obs, _, terminated, truncated, info = env.step(act)
        step += 1
        if on_step is not None:
            on_step(step, info)
        if frame_every and (step % frame_every == 0 or terminated or truncated):
            frames.append(render())
        if terminated or truncated:
            break
    return EpisodeRecord(
        seed=int(seed),
        obs=np.asarray(observations, dtype=np.float32),
        action=np.asarray(actions, dtype=np.float32),
        result=env.result(),
        frames=frames,
    )


def summarize(results: list[EpisodeResult] | list[PushTResult], control_dt: float) -> dict[str, Any]:
    """Rates over all episodes; left_fraction is over the episodes whose hand got past the pillar.

    Push-T episodes report success and the mean of each episode's maximum coverage instead.
    """
    n = len(results)
    if results and isinstance(results[0], PushTResult):
        durations = [r.duration for r in results]
        return {
            "episodes": n,
            "success_rate": float(np.mean([r.success for r in results])),
            "mean_coverage": float(np.mean([r.coverage for r in results])),
            "mean_final_coverage": float(np.mean([r.final_coverage for r in results])),
            "mean_episode_seconds": float(np.mean(durations)),
            "max_episode_seconds": float(np.max(durations)),
            "control_dt": control_dt,
        }
    sided = [r.side for r in results if r.side is not None]
    durations = [r.duration for r in results]
    return {
        "episodes": n,
        "success_rate": float(np.mean([r.success for r in results])) if n else 0.0,
        "collision_rate": float(np.mean([r.collision for r in results])) if n else 0.0,
        "left_fraction": float(np.mean([s == "left" for s in sided])) if sided else 0.0,
        "episodes_with_side": len(sided),
        "mean_episode_seconds": float(np.mean(durations)) if n else 0.0,
        "min_episode_seconds": float(np.min(durations)) if n else 0.0,
        "max_episode_seconds": float(np.max(durations)) if n else 0.0,
        "control_dt": control_dt,
    }


def collect(
    task: str,
    episodes: int,
    out: str | Path,
    seed: int = 0,
    only_success: bool = True,
    model_path: str | None = None,
    progress: bool = True,
    camera: str | None = None,
    image_size: tuple[int, int] = (64, 64),
) -> dict[str, Any]:
    """Run ``episodes`` expert episodes (env seeds seed, seed+1, ...) and write them to ``out``.

    With ``only_success`` (the default, for training data) failed episodes are left out of the file; without
    it every episode is written with its flags. The summary always covers all episodes that were run. With
    ``camera``, one frame of ``image_size`` (height, width) per control step goes into ``/images``.
    """
    check_task(task)
    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    if camera is not None and min(image_size) < 8:
        raise ValueError(f"image size must be at least 8x8, got {image_size[0]}x{image_size[1]}")
    size = {"height": image_size[0], "width": image_size[1]} if camera is not None else {}
    env = make(task, model_path=model_path, **size)
    if camera is not None:
        check_camera(env, camera)
    expert = make_expert(task, env, model_path)
    records: list[EpisodeRecord] = []
    results: list[Any] = []
    seeds = range(seed, seed + episodes)
    iterator: Any = seeds
    if progress:
        from tqdm import tqdm

        iterator = tqdm(seeds, desc=f"collect {task}", unit="ep")
    n_success = 0
    for s in iterator:
        rec = run_episode(env, expert, s, frame_every=1 if camera else None, camera=camera)
        rec.frames = rec.frames[: rec.steps]  # the last frame follows the last action: no observation
        results.append(rec.result)
        n_success += rec.result.success
        if rec.result.success or not only_success:
            records.append(rec)
        if progress:
            iterator.set_postfix(success=f"{n_success}/{len(results)}")
    env.close()
    lengths = [r.steps for r in records]
    sha = write_dataset(
        out,
        obs=np.concatenate([r.obs for r in records])
        if records
        else np.zeros((0, len(env.obs_names)), np.float32),
        action=(
            np.concatenate([r.action for r in records])
            if records
            else np.zeros((0, len(env.action_names)), np.float32)
        ),
        episode_ends=np.cumsum(lengths, dtype=np.int64),
        episode_success=[r.result.success for r in records],
        episode_side=[side_code(r.result.side) for r in records],
        episode_seed=[r.seed for r in records],
        task=task,
        obs_names=env.obs_names,
        action_names=env.action_names,
        control_dt=env.control_dt,
        images=np.concatenate([np.stack(r.frames) for r in records]) if camera and records else None,
        contract=json.dumps(recorded_contract(task, camera, image_size)),
    )
    summary = summarize(results, env.control_dt)
    summary.update(
        task=task,
        seed=seed,
        only_success=only_success,
        episodes_written=len(records),
        steps_written=int(sum(lengths)),
        out=str(out),
        sha256=sha,
        **({"camera": camera, "image_size": list(image_size)} if camera else {}),
    )
    return summary
