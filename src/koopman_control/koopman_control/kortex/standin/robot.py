"""The arm behind the stand-in's API: the MuJoCo Gen3 stepped in real time, Kortex's servoing rules on top, and
the reach task scored in its scene, the way the physical cell would be watched by a person or a camera.

The rules are the ones that matter for safety: calls fail without a session, a connection that goes quiet for
longer than its inactivity timeout is dropped and the arm stops, an emergency stop faults the arm until
``ClearFaults``, low-level position frames are only accepted in low-level servoing, joint speeds are integrated
into the position servo's targets. The service clients (:mod:`koopman_control.kortex.standin.api`) apply them
under :attr:`StandinRobot.lock`.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import Counter, deque
from typing import Any

import numpy as np

from koopman_control.core.realtime import PeriodicLoop
from koopman_control.kortex import STANDIN_IP, units
from koopman_control.kortex.standin.messages import (
    ARMSTATE_IN_FAULT,
    ARMSTATE_SERVOING_LOW_LEVEL,
    ARMSTATE_SERVOING_PLAYING_SEQUENCE,
    ARMSTATE_SERVOING_READY,
    ERROR_DEVICE,
    ERROR_NO_SESSION,
    LOW_LEVEL_SERVOING,
    SINGLE_LEVEL_SERVOING,
    Feedback,
    KClientException,
    KServerException,
)


class Session:
    """One open session of one connection (TCP or UDP port), with its inactivity timeouts."""

    def __init__(self, sid: int, port: int, session_timeout_s: float, connection_timeout_s: float) -> None:
        self.id = sid
        self.port = port
        self.session_timeout_s = session_timeout_s
        self.connection_timeout_s = connection_timeout_s
        self.last_call = time.monotonic()
        self.open = True


class StandinRobot:
    """The simulated arm behind the API: Gen3Arm stepped in real time, Kortex's servoing rules on top."""

    n_actuators = 7

    def __init__(self, ip: str = STANDIN_IP, *, physics_rate_hz: float = 500.0, model_path: str | None = None,
                 username: str = "admin", password: str = "admin", with_task: bool = True,
                 time_limit: float = 8.0, seed: int = 0, action_speed: float = 0.5) -> None:
        import gen3_description as gen3
        from koopman_sim.arm import Gen3Arm

        self.ip = ip
        self.credentials = (username, password)
        self.arm = Gen3Arm(model_path, physics_dt=1.0 / physics_rate_hz)
        self.task = None
        if with_task:
            from koopman_sim.tasks.reach_obstacle import ReachObstacleTask

            self.task = ReachObstacleTask(self.arm, time_limit=time_limit)  # rebuilds the model: before caching
        self.lower, self.upper = np.array(gen3.JOINT_LOWER), np.array(gen3.JOINT_UPPER)
        self.vmax = np.array(gen3.VELOCITY_LIMITS)
        self.dt = 1.0 / physics_rate_hz
        self.action_speed = float(action_speed)  # rad/s of the arm's own reach-joint-angles motions
        self.seed = int(seed)
        self.lock = threading.RLock()
        self.servoing_mode = SINGLE_LEVEL_SERVOING
        self.fault_bank_a = 0
        self.speeds = np.zeros(7)  # rad/s, high-level joint speed command being executed
        self.action_goal: np.ndarray | None = None
        self.frame_id = 0
        self.sessions: dict[int, Session] = {}
        self._ids = itertools.count(1)
        self.log: deque[tuple[str, str]] = deque(maxlen=5000)  # (call, detail): recent API calls, in order
        self.calls: Counter[str] = Counter()  # every call received, by name
        # What reached the "motors": joint speed commands (rad/s) and low-level position frames (rad).
        self.speed_commands: deque[np.ndarray] = deque(maxlen=20000)
        self.position_commands: deque[np.ndarray] = deque(maxlen=20000)
        self.position_command_times: deque[float] = deque(maxlen=20000)
        self.dropped_sessions = 0
        self.episode = 0
        self.results: list[dict[str, Any]] = []
        self.scoring = False  # the task is scored from start_scoring() (the controller's first command) on
        self._scored = False
        self.loop = PeriodicLoop(physics_rate_hz, self._step, name="kortex-standin")

    # -- lifecycle ------------------------------------------------------------------------------------------------
    def start(self) -> StandinRobot:
        self.loop.start()
        return self

    def stop(self) -> None:
        self.loop.stop()

    def reset_episode(self, seed: int | None = None) -> dict[str, Any]:
        """New task episode: the arm is put back at the (noisy) start pose, a new target and pillar are placed.

        Not part of the API: it is the cell being reset by hand. Motion commands are cancelled."""
        with self.lock:
            self.episode += 1
            s = int(seed) if seed is not None else self.seed * 100_003 + self.episode
            self.speeds[:] = 0.0
            self.action_goal = None
            if self.task is not None:
                self.task.reset(np.random.default_rng(s))
                self.task.update()
            self._scored = False
            self.scoring = False
            return {"episode": self.episode, "seed": s,
                    "target": None if self.task is None else self.task.target.tolist(),
                    "pillar": None if self.task is None else self.task.pillar.tolist()}

    def start_scoring(self) -> None:
        """The controller took over: the task's clock starts now (see koopman_control.core.episodes)."""
        with self.lock:
            if self.task is not None and not self.scoring:
                self.task.restart_clock()
                self.scoring = True

    # -- physics --------------------------------------------------------------------------------------------------
    def _step(self, skipped: int) -> None:
        with self.lock:
            self._expire_sessions()
            arm = self.arm
            for _ in range(1 + min(skipped, 20)):
                if self.action_goal is not None:
                    err = self.action_goal - arm.target
                    reach = self.action_speed * self.dt
                    scale = min(1.0, reach / max(float(np.max(np.abs(err))), 1e-12))
                    arm.set_target(arm.target + scale * err)
                    if np.max(np.abs(self.action_goal - arm.q)) < np.deg2rad(0.2):
                        self.action_goal = None
                elif self.servoing_mode == SINGLE_LEVEL_SERVOING and self.fault_bank_a == 0 and self.speeds.any():
                    # Firmware: never beyond the rated speeds, a target stops at the joint's command range.
                    v = np.clip(self.speeds, -self.vmax, self.vmax)
                    arm.set_target(np.clip(arm.target + v * self.dt, self.lower, self.upper))
                arm.step(1)
                if self.task is not None and self.scoring and not self._scored:
                    self.task.update()
                    if self.task.done:
                        self._scored = True
                        self.results.append({"episode": self.episode, **self.task.result().to_dict()})

    def hold(self) -> None:
        """Stop where the arm is (what the arm does on Stop, a fault or a lost connection)."""
        self.speeds[:] = 0.0
        self.action_goal = None
        self.arm.set_target(np.clip(self.arm.q, self.lower, self.upper))

    def _expire_sessions(self) -> None:
        now = time.monotonic()
        for s in list(self.sessions.values()):
            if now - s.last_call > s.connection_timeout_s:
                self._drop(s, "connection inactivity timeout")

    def _drop(self, s: Session, why: str) -> None:
        s.open = False
        self.sessions.pop(s.id, None)
        self.dropped_sessions += 1
        self.log.append(("SessionDropped", why))
        # The client that was driving the arm is gone: stop, and leave low-level servoing.
        self.hold()
        if self.servoing_mode == LOW_LEVEL_SERVOING:
            self.servoing_mode = SINGLE_LEVEL_SERVOING

    # -- requests (called by the service clients) -------------------------------------------------------------
    def open_session(self, port: int, info: Any) -> Session:
        with self.lock:
            self.log.append(("CreateSession", f"port {port}"))
            if (info.username, info.password) != self.credentials:
                raise KServerException(ERROR_NO_SESSION, 0, "CreateSession: wrong username or password")
            s = Session(next(self._ids), port, info.session_inactivity_timeout / 1000.0,
                        info.connection_inactivity_timeout / 1000.0 or 2.0)
            self.sessions[s.id] = s
            return s

    def close_session(self, s: Session) -> None:
        with self.lock:
            self.log.append(("CloseSession", f"port {s.port}"))
            if s.open:
                s.open = False
                self.sessions.pop(s.id, None)

    def call(self, s: Session | None, name: str, want_port: int) -> None:
        """Common checks of every service call (under ``lock``)."""
        if s is None or not s.open:
            raise KServerException(ERROR_NO_SESSION, 0, f"{name}: no open session on this connection")
        if s.port != want_port:
            raise KClientException(ERROR_DEVICE, 0, f"{name}: served on port {want_port}, not {s.port}")
        s.last_call = time.monotonic()
        self.calls[name] += 1
        if name not in ("RefreshFeedback", "Refresh"):
            self.log.append((name, ""))

    def feedback(self) -> Any:
        fb = Feedback()
        fb.frame_id = self.frame_id
        fb.base.active_state = self.active_state()
        fb.base.fault_bank_a = self.fault_bank_a
        q, qd = self.arm.q, self.arm.qd
        tau = self.arm.data.actuator_force[:7] if self.arm.model.nu >= 7 else np.zeros(7)
        for i in range(self.n_actuators):
            a = fb.actuators.add()
            a.position = float(units.rad_to_kortex_deg(q[i]))
            a.velocity = float(np.rad2deg(qd[i]))
            a.torque = float(tau[i])
            a.command_id = self.frame_id
            a.fault_bank_a = self.fault_bank_a
        return fb

    def active_state(self) -> int:
        if self.fault_bank_a:
            return ARMSTATE_IN_FAULT
        if self.servoing_mode == LOW_LEVEL_SERVOING:
            return ARMSTATE_SERVOING_LOW_LEVEL
        if self.action_goal is not None:
            return ARMSTATE_SERVOING_PLAYING_SEQUENCE
        return ARMSTATE_SERVOING_READY

    def angles_deg_to_rad(self, deg: np.ndarray) -> np.ndarray:
        """A [0, 360) angle command -> the equivalent angle nearest the joint's position (shortest motion)."""
        q = self.arm.q
        return q + units.wrap_to_pi(np.deg2rad(deg) - q)
