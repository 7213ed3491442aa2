"""The tasks the sim node can run, behind one interface: joints out, joint targets in, scored episodes.

A task here is the robot plus its scene, stepped in real time by :class:`~koopman_control.core.sim_driver.SimDriver`
at its physics rate: the Gen3 reaching past a pillar (``gen3_reach_obstacle``, MuJoCo, 500 Hz) and Push-T's
pusher (``pusht``, gym-pusht's pymunk space, 100 Hz). Each publishes what its contract
(``koopman_sim/tasks/<task>.yaml``) says the policy observes: the joints, the inputs fixed for an episode
(``episode_inputs``: the reach target and pillar) and those that move with the robot (``stream_inputs``: the
T block's pose), and scores the episode as the gym environment of the same name does.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from koopman_control.core.chunk import CommandChecks


class SimTask:
    """The interface; see the module docstring. ``q``/``qd`` are copies."""

    name: ClassVar[str]
    joint_names: tuple[str, ...]
    physics_dt: float  # s per physics step
    feedback_rate_hz: float  # the rate the sim publishes joint states at by default
    time_limit: float  # s per episode by default

    def own_checks(self) -> CommandChecks | None:
        """The robot's command checks when it is not the arm (None: the arm's, from config/kinova.yaml)."""
        return None

    def reset(self, seed: int) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def joints(self) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def stream_inputs(self) -> dict[str, np.ndarray]:
        return {}

    def set_target(self, q: np.ndarray) -> None:
        raise NotImplementedError

    def step(self) -> None:
        raise NotImplementedError

    def update(self) -> None:
        """Score after a physics step of a running episode."""
        raise NotImplementedError

    def restart_clock(self) -> None:
        raise NotImplementedError

    @property
    def done(self) -> bool:
        raise NotImplementedError

    def result(self) -> dict[str, Any]:
        raise NotImplementedError


class Gen3Reach(SimTask):
    """The Gen3 (MuJoCo) reaching past a pillar: the same physics and scoring as the 10 Hz gym environment."""

    name = "gen3_reach_obstacle"
    feedback_rate_hz = 500.0

    def __init__(self, physics_dt: float = 0.002, time_limit: float = 8.0, model_path: str | None = None) -> None:
        import gen3_description as gen3
        from koopman_sim.arm import Gen3Arm
        from koopman_sim.tasks.reach_obstacle import ReachObstacleTask

        self.joint_names = tuple(gen3.JOINT_NAMES)
        self.physics_dt = physics_dt
        self.time_limit = time_limit
        self.arm = Gen3Arm(model_path or None, physics_dt=physics_dt)
        self.task = ReachObstacleTask(self.arm, time_limit=time_limit)

    def reset(self, seed: int) -> dict[str, np.ndarray]:
        self.task.reset(np.random.default_rng(seed))
        self.task.update()
        return {"target": self.task.target.copy(), "pillar": self.task.pillar.copy()}

    def joints(self) -> tuple[np.ndarray, np.ndarray]:
        return self.arm.q, self.arm.qd

    def set_target(self, q: np.ndarray) -> None:
        self.arm.set_target(q)

    def step(self) -> None:
        self.arm.step(1)

    def update(self) -> None:
        self.task.update()

    def restart_clock(self) -> None:
        self.task.restart_clock()

    @property
    def done(self) -> bool:
        return self.task.done

    def result(self) -> dict[str, Any]:
        return self.task.result().to_dict()


class PushT(SimTask):
    """Push-T's pusher as two prismatic joints ``agent_x``, ``agent_y`` (px) and the block's pose as a stream.

    gym-pusht's own physics, stepped one 10 ms step at a time with its PD law towards the current target (k_p
    100, k_v 20), so a 10 Hz plan of targets drives the pusher exactly as ``env.step`` does; coverage is taken
    every control period after the clock starts, as the gym evaluation takes it after each step, and an
    episode ends on success (coverage > 0.95) or after 300 periods.
    """

    name = "pusht"
    feedback_rate_hz = 100.0
    CONTROL_DT = 0.1
    SUCCESS = 0.95

    def __init__(self, time_limit: float = 30.0) -> None:
        from gym_pusht.envs.pusht import PushTEnv

        self.env = PushTEnv(obs_type="state")
        self.env.reset(seed=0)  # a scene exists before the first episode's reset
        self.joint_names = ("agent_x", "agent_y")
        self.physics_dt = float(self.env.dt)
        self.time_limit = time_limit
        self._target: np.ndarray | None = None
        self._clock = 0
        self._coverage: list[float] = []
        self._block_start: np.ndarray | None = None

    def own_checks(self) -> CommandChecks:
        # The targets the task file's action accepts (past the table's walls, as gym-pusht takes them; set_target
        # clamps them to the table), and any start within them: the scripted demonstrations' targets lead the
        # pusher by up to 343 px (p99 122 px) when it moves to a new contact.
        from koopman_control.contracts import resolve_contract

        (action,) = resolve_contract(self.name).action
        lower, upper = np.array(action.limits.lower), np.array(action.limits.upper)
        return CommandChecks(lower, upper, watchdog_timeout=0.15, max_start_deviation=float(np.linalg.norm(
            upper - lower)), max_chunk_age=0.1, interpolation="zoh")

    def reset(self, seed: int) -> dict[str, np.ndarray]:
        self.env.reset(seed=int(seed))
        self._target = None
        self._clock = 0
        self._coverage = []
        return {}

    def joints(self) -> tuple[np.ndarray, np.ndarray]:
        a = self.env.agent
        return np.array(a.position, dtype=np.float64), np.array(a.velocity, dtype=np.float64)

    def stream_inputs(self) -> dict[str, np.ndarray]:
        b = self.env.block
        return {"block": np.array([b.position[0], b.position[1], b.angle], dtype=np.float64)}

    def set_target(self, q: np.ndarray) -> None:
        # Accepted up to the action range, clamped to the table as the evaluation's environment clamps its actions.
        from koopman_sim.tasks.pusht import TABLE

        self._target = np.clip(np.asarray(q, dtype=np.float64), *TABLE)

    def step(self) -> None:
        from pymunk import Vec2d

        env = self.env
        if self._target is not None:
            acc = env.k_p * (Vec2d(*self._target) - env.agent.position) + env.k_v * (Vec2d(0, 0) - env.agent.velocity)
            env.agent.velocity += acc * env.dt
        env.space.step(env.dt)

    def update(self) -> None:
        self._clock += 1
        per = round(self.CONTROL_DT / self.physics_dt)
        if self._clock % per == 0:
            self._coverage.append(float(self.env._get_coverage()))

    def restart_clock(self) -> None:
        self._clock = 0
        self._coverage = [float(self.env._get_coverage())]
        self._block_start = np.array(self.env.block.position, dtype=np.float64)

    @property
    def done(self) -> bool:
        steps = len(self._coverage) - 1
        return bool(self._coverage) and (self._coverage[-1] > self.SUCCESS
                                          or steps * self.CONTROL_DT >= self.time_limit - 1e-9)

    def result(self) -> dict[str, Any]:
        cov = self._coverage or [0.0]
        best = max(cov)
        moved = np.linalg.norm(np.array(self.env.block.position) - self._block_start) \
            if self._block_start is not None else 0.0
        return {"success": best > self.SUCCESS, "collision": False, "side": None, "coverage": best,
                "final_coverage": cov[-1], "block_moved_px": float(moved), "steps": len(cov) - 1,
                "duration": (len(cov) - 1) * self.CONTROL_DT}


TASKS: dict[str, type[SimTask]] = {t.name: t for t in (Gen3Reach, PushT)}


def make_task(name: str, *, physics_dt: float | None = None, time_limit: float = 0.0,
              model_path: str | None = None) -> SimTask:
    """A task by name; ``time_limit`` 0 and ``physics_dt`` None take the task's own."""
    if name not in TASKS:
        raise ValueError(f"the sim runs tasks {', '.join(TASKS)}, not {name!r}")
    if name == Gen3Reach.name:
        return Gen3Reach(physics_dt or 0.002, time_limit or 8.0, model_path)
    if model_path:
        raise ValueError(f"task {name} has no model file to replace")
    return PushT(time_limit or 30.0)
