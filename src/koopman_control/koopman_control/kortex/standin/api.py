"""The stand-in's ``kortex_api`` surface: transports, router, session manager, ``BaseClient``, ``BaseCyclicClient``,
and the registry of robots that ``connect`` finds.

No sockets are opened: :func:`serve` registers a :class:`~koopman_control.kortex.standin.robot.StandinRobot` under
its IP address and ``TCPTransport.connect(ip, 10000)`` / ``UDPTransport.connect(ip, 10001)`` find it there.
:func:`api_namespace` bundles these names as :func:`koopman_control.kortex.api.load_api` bundles Kinova's, so the
bridge runs one code path against either.
"""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace
from typing import Any

import numpy as np

from koopman_control.kortex import units
from koopman_control.kortex.standin.messages import (
    ERROR_DEVICE,
    ERROR_IN_FAULT,
    ERROR_INVALID_PARAM,
    ERROR_WRONG_MODE,
    FAULT_EMERGENCY_STOP,
    FAULT_FOLLOWING_ERROR,
    LOW_LEVEL_SERVOING,
    SINGLE_LEVEL_SERVOING,
    ActuatorInformation,
    ArmStateInformation,
    Base_pb2,
    BaseCyclic_pb2,
    JointAngles,
    KClientException,
    KServerException,
    ServoingModeInformation,
    Session_pb2,
)
from koopman_control.kortex.standin.robot import Session, StandinRobot

TCP_PORT = 10000
UDP_PORT = 10001

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
        self.session: Session | None = None

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
            r.hold()
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
            self._enter("Stop").hold()

    def ApplyEmergencyStop(self, deviceId: int = 0, options: Any = None) -> None:
        with self.router.robot.lock:
            r = self._enter("ApplyEmergencyStop")
            r.hold()
            r.fault_bank_a |= FAULT_EMERGENCY_STOP
            r.servoing_mode = SINGLE_LEVEL_SERVOING

    def ClearFaults(self, deviceId: int = 0, options: Any = None) -> None:
        with self.router.robot.lock:
            r = self._enter("ClearFaults")
            r.fault_bank_a = 0
            r.hold()

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
                    r.fault_bank_a |= FAULT_FOLLOWING_ERROR
                    r.hold()
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
