"""A Kinova Gen3 stand-in: the part of ``kortex_api`` the bridge uses, served by the MuJoCo Gen3.

There is no arm here, so this module mirrors the API's module and class surface (transports, router,
session manager, ``BaseClient``, ``BaseCyclicClient``, the ``Session_pb2`` / ``Base_pb2`` /
``BaseCyclic_pb2`` messages with Kortex units: degrees in [0, 360), deg/s) and the arm's behaviour that
matters for safety: calls fail without a session, a connection that goes quiet for longer than its
inactivity timeout is dropped and the arm stops, an emergency stop faults the arm until ``ClearFaults``,
low-level position frames are only accepted in low-level servoing, joint speeds are integrated into the
position servo's targets. The bridge's code path is therefore the one that runs against a real arm; only
the module object differs (``backend: standin``).

No sockets are opened: :func:`serve` registers a :class:`StandinRobot` under an IP address and
``TCPTransport.connect(ip, 10000)`` / ``UDPTransport.connect(ip, 10001)`` find it there. The robot steps
``koopman_sim.arm.Gen3Arm`` on a real-time thread (500 Hz by default) and, when asked, scores the reach
task in its scene, the way the physical cell would be watched by a person or a camera.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import Counter, deque
from types import SimpleNamespace
from typing import Any, ClassVar

import numpy as np

from koopman_control.core.realtime import PeriodicLoop
from koopman_control.kortex import units

TCP_PORT = 10000
UDP_PORT = 10001
DEFAULT_IP = "192.168.1.10"


# -- errors (kortex_api.Exceptions) ------------------------------------------------------------------------------
class KException(Exception):
    def __init__(self, code: int, sub_code: int, description: str) -> None:
        super().__init__(description)
        self._code, self._sub = code, sub_code

    def get_error_code(self) -> int:
        return self._code

    def get_error_sub_code(self) -> int:
        return self._sub


class KServerException(KException):
    """The arm refused a request (no session, wrong servoing mode, in fault...)."""


class KClientException(KException):
    """The request never got an answer (not connected, connection dropped)."""


Exceptions = SimpleNamespace(KServerException=SimpleNamespace(KServerException=KServerException),
                             KClientException=SimpleNamespace(KClientException=KClientException))

# Error codes, as in Errors_pb2 (values only need to be distinct here).
ERROR_DEVICE, ERROR_NO_SESSION, ERROR_WRONG_MODE, ERROR_IN_FAULT, ERROR_INVALID_PARAM = 1, 2, 3, 4, 5


# -- protobuf-like messages -------------------------------------------------------------------------------------
class _Repeated(list):
    """A repeated message field: ``add()`` appends a new element, as in protobuf."""

    def __init__(self, factory: type) -> None:
        super().__init__()
        self._factory = factory

    def add(self) -> Any:
        item = self._factory()
        self.append(item)
        return item


class _Msg:
    _fields: ClassVar[dict[str, Any]] = {}

    def __init__(self, **kw: Any) -> None:
        for name, default in self._fields.items():
            if isinstance(default, type) and issubclass(default, _Msg):
                setattr(self, name, default())
            elif isinstance(default, tuple) and default[0] == "repeated":
                setattr(self, name, _Repeated(default[1]))
            else:
                setattr(self, name, default)
        for k, v in kw.items():
            if k not in self._fields:
                raise AttributeError(f"{type(self).__name__} has no field {k!r}")
            setattr(self, k, v)

    def __setattr__(self, name: str, value: Any) -> None:
        if name not in self._fields and not name.startswith("_"):
            raise AttributeError(f"{type(self).__name__} has no field {name!r}")
        super().__setattr__(name, value)

    def __repr__(self) -> str:
        body = ", ".join(f"{k}={getattr(self, k)!r}" for k in self._fields)
        return f"{type(self).__name__}({body})"


def _msg(type_name: str, /, **fields: Any) -> type[_Msg]:
    return type(type_name, (_Msg,), {"_fields": fields})


def _rep(factory: type) -> tuple[str, type]:
    return ("repeated", factory)


# Session_pb2
CreateSessionInfo = _msg("CreateSessionInfo", username="", password="", session_inactivity_timeout=0,
                         connection_inactivity_timeout=0)
Session_pb2 = SimpleNamespace(CreateSessionInfo=CreateSessionInfo)

# Base_pb2
UNSPECIFIED_SERVOING_MODE, SINGLE_LEVEL_SERVOING, LOW_LEVEL_SERVOING, BYPASS_SERVOING = 0, 2, 3, 4
(ARMSTATE_UNSPECIFIED, ARMSTATE_BASE_INITIALIZATION, ARMSTATE_IDLE, ARMSTATE_INITIALIZATION, ARMSTATE_IN_FAULT,
 ARMSTATE_MAINTENANCE, ARMSTATE_SERVOING_LOW_LEVEL, ARMSTATE_SERVOING_READY, ARMSTATE_SERVOING_PLAYING_SEQUENCE,
 ARMSTATE_SERVOING_MANUALLY_CONTROLLED) = range(10)
JointSpeed = _msg("JointSpeed", joint_identifier=0, value=0.0, duration=0)
JointSpeeds = _msg("JointSpeeds", joint_speeds=_rep(JointSpeed), duration=0)
JointAngle = _msg("JointAngle", joint_identifier=0, value=0.0)
JointAngles = _msg("JointAngles", joint_angles=_rep(JointAngle))
ConstrainedJointAngles = _msg("ConstrainedJointAngles", joint_angles=JointAngles)
Action = _msg("Action", name="", application_data="", reach_joint_angles=ConstrainedJointAngles)
ServoingModeInformation = _msg("ServoingModeInformation", servoing_mode=UNSPECIFIED_SERVOING_MODE)
ArmStateInformation = _msg("ArmStateInformation", active_state=ARMSTATE_UNSPECIFIED, connection=None)
ActuatorInformation = _msg("ActuatorInformation", count=0)
Base_pb2 = SimpleNamespace(
    JointSpeed=JointSpeed, JointSpeeds=JointSpeeds, JointAngle=JointAngle, JointAngles=JointAngles,
    ConstrainedJointAngles=ConstrainedJointAngles, Action=Action, ServoingModeInformation=ServoingModeInformation,
    ArmStateInformation=ArmStateInformation, ActuatorInformation=ActuatorInformation,
    UNSPECIFIED_SERVOING_MODE=UNSPECIFIED_SERVOING_MODE, SINGLE_LEVEL_SERVOING=SINGLE_LEVEL_SERVOING,
    LOW_LEVEL_SERVOING=LOW_LEVEL_SERVOING, BYPASS_SERVOING=BYPASS_SERVOING,
    ARMSTATE_IN_FAULT=ARMSTATE_IN_FAULT, ARMSTATE_SERVOING_READY=ARMSTATE_SERVOING_READY,
    ARMSTATE_SERVOING_LOW_LEVEL=ARMSTATE_SERVOING_LOW_LEVEL,
    ARMSTATE_SERVOING_PLAYING_SEQUENCE=ARMSTATE_SERVOING_PLAYING_SEQUENCE,
)

# BaseCyclic_pb2
ActuatorCommand = _msg("ActuatorCommand", command_id=0, flags=0, position=0.0, velocity=0.0, torque_joint=0.0,
                       current_motor=0.0)
ActuatorFeedback = _msg("ActuatorFeedback", command_id=0, status_flags=0, jitter_comm=0, position=0.0,
                        velocity=0.0, torque=0.0, current_motor=0.0, voltage=0.0, temperature_motor=0.0,
                        temperature_core=0.0, fault_bank_a=0, fault_bank_b=0, warning_bank_a=0, warning_bank_b=0)
BaseFeedback = _msg("BaseFeedback", active_state_connection_identifier=0, active_state=ARMSTATE_UNSPECIFIED,
                    arm_voltage=24.0, arm_current=0.0, fault_bank_a=0, fault_bank_b=0, warning_bank_a=0,
                    warning_bank_b=0)
Command = _msg("Command", frame_id=0, actuators=_rep(ActuatorCommand))
Feedback = _msg("Feedback", frame_id=0, base=BaseFeedback, actuators=_rep(ActuatorFeedback))
BaseCyclic_pb2 = SimpleNamespace(Command=Command, Feedback=Feedback, ActuatorCommand=ActuatorCommand,
                                 ActuatorFeedback=ActuatorFeedback, BaseFeedback=BaseFeedback)

FAULT_EMERGENCY_STOP = 1 << 0  # fault_bank_a bit reported after ApplyEmergencyStop


# -- the robot ----------------------------------------------------------------------------------------------------
class _Session:
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

    def __init__(self, ip: str = DEFAULT_IP, *, physics_rate_hz: float = 500.0, model_path: str | None = None,
                 username: str = "admin", password: str = "admin", with_task: bool = True,
                 time_limit: float = 8.0, seed: int = 0, action_speed: float = 0.5) -> None:
        from koopman_sim import gen3
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
        self.sessions: dict[int, _Session] = {}
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

    def _hold(self) -> None:
        """Stop where the arm is (what the arm does on Stop, a fault or a lost connection)."""
        self.speeds[:] = 0.0
        self.action_goal = None
        self.arm.set_target(np.clip(self.arm.q, self.lower, self.upper))

    def _expire_sessions(self) -> None:
        now = time.monotonic()
        for s in list(self.sessions.values()):
            if now - s.last_call > s.connection_timeout_s:
                self._drop(s, "connection inactivity timeout")

    def _drop(self, s: _Session, why: str) -> None:
        s.open = False
        self.sessions.pop(s.id, None)
        self.dropped_sessions += 1
        self.log.append(("SessionDropped", why))
        # The client that was driving the arm is gone: stop, and leave low-level servoing.
        self._hold()
        if self.servoing_mode == LOW_LEVEL_SERVOING:
            self.servoing_mode = SINGLE_LEVEL_SERVOING

    # -- requests (called by the clients below) -----------------------------------------------------------------
    def open_session(self, port: int, info: Any) -> _Session:
        with self.lock:
            self.log.append(("CreateSession", f"port {port}"))
            if (info.username, info.password) != self.credentials:
                raise KServerException(ERROR_NO_SESSION, 0, "CreateSession: wrong username or password")
            s = _Session(next(self._ids), port, info.session_inactivity_timeout / 1000.0,
                         info.connection_inactivity_timeout / 1000.0 or 2.0)
            self.sessions[s.id] = s
            return s

    def close_session(self, s: _Session) -> None:
        with self.lock:
            self.log.append(("CloseSession", f"port {s.port}"))
            if s.open:
                s.open = False
                self.sessions.pop(s.id, None)

    def call(self, s: _Session | None, name: str, want_port: int) -> None:
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


_ROBOTS: dict[str, StandinRobot] = {}
_REG_LOCK = threading.Lock()


def serve(robot: StandinRobot) -> StandinRobot:
    """Make ``robot`` reachable at its IP address and start its physics."""
    with _REG_LOCK:
        old = _ROBOTS.get(robot.ip)
        if old is not None and old is not robot:
            raise RuntimeError(f"a stand-in robot already serves {robot.ip}")
        _ROBOTS[robot.ip] = robot
    if not robot.loop.running:
        robot.start()
    return robot


def unserve(robot: StandinRobot) -> None:
    robot.stop()
    with _REG_LOCK:
        if _ROBOTS.get(robot.ip) is robot:
            del _ROBOTS[robot.ip]


def robot_at(ip: str) -> StandinRobot | None:
    with _REG_LOCK:
        return _ROBOTS.get(ip)


# -- transport, router, sessions (kortex_api.TCPTransport, UDPTransport, RouterClient, SessionManager) ------------
class _Transport:
    port_kind = TCP_PORT

    def __init__(self) -> None:
        self.robot: StandinRobot | None = None
        self.port = 0

    def connect(self, ip: str, port: int) -> None:
        robot = robot_at(ip)
        if robot is None:
            raise KClientException(ERROR_DEVICE, 0, f"connect: no arm answers at {ip}:{port}")
        if port not in (TCP_PORT, UDP_PORT):
            raise KClientException(ERROR_DEVICE, 0, f"connect: nothing listens on port {port}")
        self.robot, self.port = robot, int(port)

    def disconnect(self) -> None:
        self.robot = None


class TCPTransport(_Transport):
    pass


class UDPTransport(_Transport):
    pass


class RouterClientSendOptions:
    def __init__(self) -> None:
        self.andForget = False
        self.delay_ms = 0
        self.timeout_ms = 10000


class RouterClient:
    def __init__(self, transport: _Transport, error_callback: Any = None) -> None:
        self.transport = transport
        self.error_callback = error_callback
        self.session: _Session | None = None

    @staticmethod
    def basicErrorCallback(exception: BaseException) -> None:
        print(f"kortex router error: {exception}")

    @property
    def robot(self) -> StandinRobot:
        if self.transport.robot is None:
            raise KClientException(ERROR_DEVICE, 0, "not connected")
        return self.transport.robot


class SessionManager:
    """Like Kinova's, it keeps its session alive with a heartbeat thread while the client process lives: the
    arm's connection inactivity timeout fires when the process is gone, not when it merely sends nothing
    (a cyclic-mode client never uses its TCP connection). ``halt_heartbeat`` simulates the process dying."""

    def __init__(self, router: RouterClient) -> None:
        self.router = router
        self._halt = threading.Event()

    def CreateSession(self, info: Any) -> None:
        s = self.router.robot.open_session(self.router.transport.port, info)
        self.router.session = s
        period = max(0.01, s.connection_timeout_s / 4.0)

        def beat() -> None:
            while s.open and not self._halt.wait(period):
                s.last_call = time.monotonic()

        threading.Thread(target=beat, name="kortex-standin-heartbeat", daemon=True).start()

    def CloseSession(self, options: Any = None) -> None:
        self._halt.set()
        if self.router.session is not None:
            self.router.robot.close_session(self.router.session)

    def halt_heartbeat(self) -> None:
        self._halt.set()


# -- service clients ------------------------------------------------------------------------------------------------
class BaseClient:
    """High-level services (TCP port 10000)."""

    def __init__(self, router: RouterClient) -> None:
        self.router = router

    def _enter(self, name: str) -> StandinRobot:
        r = self.router.robot
        r.call(self.router.session, name, TCP_PORT)
        return r

    def GetActuatorCount(self, deviceId: int = 0, options: Any = None) -> Any:
        with self.router.robot.lock:
            r = self._enter("GetActuatorCount")
            return ActuatorInformation(count=r.n_actuators)

    def GetArmState(self, deviceId: int = 0, options: Any = None) -> Any:
        with self.router.robot.lock:
            r = self._enter("GetArmState")
            return ArmStateInformation(active_state=r.active_state())

    def GetServoingMode(self, deviceId: int = 0, options: Any = None) -> Any:
        with self.router.robot.lock:
            r = self._enter("GetServoingMode")
            return ServoingModeInformation(servoing_mode=r.servoing_mode)

    def SetServoingMode(self, info: Any, deviceId: int = 0, options: Any = None) -> None:
        with self.router.robot.lock:
            r = self._enter("SetServoingMode")
            if info.servoing_mode not in (SINGLE_LEVEL_SERVOING, LOW_LEVEL_SERVOING):
                raise KServerException(ERROR_INVALID_PARAM, 0, f"servoing mode {info.servoing_mode} unsupported")
            if info.servoing_mode == LOW_LEVEL_SERVOING and r.fault_bank_a:
                raise KServerException(ERROR_IN_FAULT, 0, "SetServoingMode: arm in fault, clear faults first")
            r.log[-1] = ("SetServoingMode", "LOW_LEVEL" if info.servoing_mode == LOW_LEVEL_SERVOING else "SINGLE_LEVEL")
            r._hold()
            r.servoing_mode = info.servoing_mode

    def GetMeasuredJointAngles(self, deviceId: int = 0, options: Any = None) -> Any:
        with self.router.robot.lock:
            r = self._enter("GetMeasuredJointAngles")
            out = JointAngles()
            for i, d in enumerate(units.rad_to_kortex_deg(r.arm.q)):
                ja = out.joint_angles.add()
                ja.joint_identifier, ja.value = i, float(d)
            return out

    def SendJointSpeedsCommand(self, speeds: Any, deviceId: int = 0, options: Any = None) -> None:
        with self.router.robot.lock:
            r = self._enter("SendJointSpeedsCommand")
            if r.fault_bank_a:
                raise KServerException(ERROR_IN_FAULT, 0, "SendJointSpeedsCommand: arm in fault")
            if r.servoing_mode != SINGLE_LEVEL_SERVOING:
                raise KServerException(ERROR_WRONG_MODE, 0, "SendJointSpeedsCommand: needs single-level servoing")
            v = np.zeros(r.n_actuators)
            seen = set()
            for js in speeds.joint_speeds:
                i = int(js.joint_identifier)
                if not 0 <= i < r.n_actuators or not np.isfinite(js.value):
                    raise KServerException(ERROR_INVALID_PARAM, 0, f"bad joint speed {js!r}")
                v[i] = np.deg2rad(js.value)
                seen.add(i)
            if len(seen) != r.n_actuators:
                raise KServerException(ERROR_INVALID_PARAM, 0, "SendJointSpeedsCommand: a speed for every joint")
            r.action_goal = None
            r.speeds = v
            r.speed_commands.append(v)

    def Stop(self, deviceId: int = 0, options: Any = None) -> None:
        with self.router.robot.lock:
            self._enter("Stop")._hold()

    def ApplyEmergencyStop(self, deviceId: int = 0, options: Any = None) -> None:
        with self.router.robot.lock:
            r = self._enter("ApplyEmergencyStop")
            r._hold()
            r.fault_bank_a |= FAULT_EMERGENCY_STOP
            r.servoing_mode = SINGLE_LEVEL_SERVOING

    def ClearFaults(self, deviceId: int = 0, options: Any = None) -> None:
        with self.router.robot.lock:
            r = self._enter("ClearFaults")
            r.fault_bank_a = 0
            r._hold()

    def ExecuteAction(self, action: Any, deviceId: int = 0, options: Any = None) -> None:
        with self.router.robot.lock:
            r = self._enter("ExecuteAction")
            if r.fault_bank_a:
                raise KServerException(ERROR_IN_FAULT, 0, "ExecuteAction: arm in fault")
            if r.servoing_mode != SINGLE_LEVEL_SERVOING:
                raise KServerException(ERROR_WRONG_MODE, 0, "ExecuteAction: needs single-level servoing")
            angles = action.reach_joint_angles.joint_angles.joint_angles
            if len(angles) != r.n_actuators:
                raise KServerException(ERROR_INVALID_PARAM, 0, "ExecuteAction: reach_joint_angles needs 7 angles")
            deg = np.zeros(r.n_actuators)
            for ja in angles:
                deg[int(ja.joint_identifier)] = ja.value
            goal = np.clip(r.angles_deg_to_rad(deg), r.lower, r.upper)
            r.speeds[:] = 0.0
            r.action_goal = goal


class BaseCyclicClient:
    """1 kHz cyclic services (UDP port 10001)."""

    def __init__(self, router: RouterClient) -> None:
        self.router = router

    def RefreshFeedback(self, deviceId: int = 0, options: Any = None) -> Any:
        r = self.router.robot
        with r.lock:
            r.call(self.router.session, "RefreshFeedback", UDP_PORT)
            return r.feedback()

    def Refresh(self, command: Any, deviceId: int = 0, options: Any = None) -> Any:
        r = self.router.robot
        with r.lock:
            r.call(self.router.session, "Refresh", UDP_PORT)
            if r.servoing_mode == LOW_LEVEL_SERVOING and not r.fault_bank_a:
                deg = np.array([a.position for a in command.actuators], dtype=np.float64)
                if deg.shape != (r.n_actuators,) or not np.isfinite(deg).all():
                    raise KServerException(ERROR_INVALID_PARAM, 0, "Refresh: 7 finite actuator positions needed")
                if ((deg < 0.0) | (deg >= 360.0)).any():
                    raise KServerException(ERROR_INVALID_PARAM, 0, "Refresh: positions must be in [0, 360) deg")
                target = r.angles_deg_to_rad(deg)
                # An actuator refuses a frame that jumps (following error); 20 deg in one frame is a bug.
                if np.max(np.abs(target - r.arm.q)) > np.deg2rad(20.0):
                    r.fault_bank_a |= 1 << 1
                    r._hold()
                    raise KServerException(ERROR_INVALID_PARAM, 0, "Refresh: following error, arm faulted")
                r.arm.set_target(np.clip(target, r.lower, r.upper))
                r.position_commands.append(target)
                r.position_command_times.append(time.monotonic())
                r.frame_id = int(command.frame_id)
            return r.feedback()


def api_namespace() -> SimpleNamespace:
    """The stand-in as the bridge's API bundle (same names as :func:`koopman_control.kortex.api.load_api`)."""
    return SimpleNamespace(
        name="standin", TCPTransport=TCPTransport, UDPTransport=UDPTransport, RouterClient=RouterClient,
        RouterClientSendOptions=RouterClientSendOptions, SessionManager=SessionManager, BaseClient=BaseClient,
        BaseCyclicClient=BaseCyclicClient, Session_pb2=Session_pb2, Base_pb2=Base_pb2, BaseCyclic_pb2=BaseCyclic_pb2,
        errors=(KServerException, KClientException),
    )
