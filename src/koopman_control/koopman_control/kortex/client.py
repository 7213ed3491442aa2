"""KortexClient: the few Kortex calls the bridge needs, in the order Kinova's examples make them.

Two connections, as on the arm: TCP port 10000 for the high-level ``BaseClient`` (about a 25 ms cycle) and
UDP port 10001 for ``BaseCyclicClient`` (1 kHz ``Refresh``), each with its own session. Everything here is
in Kortex units (degrees, deg/s); conversion and limits live in the bridge, but this layer still refuses
non-finite numbers as the last line before the wire.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np

N_JOINTS = 7


class KortexError(RuntimeError):
    """A Kortex call failed (refused by the arm or no answer); the message names the call."""


@dataclass(frozen=True)
class ArmFeedback:
    """One cyclic feedback frame, Kortex units."""

    position_deg: np.ndarray  # [0, 360)
    velocity_deg_s: np.ndarray
    torque_nm: np.ndarray
    active_state: int
    fault_bank_a: int
    frame_id: int


@dataclass(frozen=True)
class ConnectionConfig:
    ip: str = "192.168.1.10"
    tcp_port: int = 10000
    udp_port: int = 10001
    username: str = "admin"
    password: str = "admin"
    session_inactivity_timeout_ms: int = 60000
    connection_inactivity_timeout_ms: int = 2000
    request_timeout_ms: int = 3000  # TCP (high level) calls
    cyclic_timeout_ms: int = 3  # UDP Refresh: a late frame is worse than a lost one


class KortexClient:
    """Sessions and calls over one API bundle (``kortex_api`` or the stand-in)."""

    def __init__(self, api: SimpleNamespace, conn: ConnectionConfig) -> None:
        self.api = api
        self.conn = conn
        self.base: Any = None
        self.cyclic: Any = None
        self._links: list[tuple[Any, Any, Any]] = []  # (transport, router, session manager)
        self._tcp_lock = threading.Lock()  # one high-level request at a time
        self._command = None
        self._udp_options = None
        self._tcp_options = None
        self.connected = False
        self.close_errors: list[str] = []

    # -- sessions ---------------------------------------------------------------------------------------------
    def _open(self, transport_cls: Any, port: int) -> Any:
        api, c = self.api, self.conn
        transport = transport_cls()
        router = api.RouterClient(transport, api.RouterClient.basicErrorCallback)
        transport.connect(c.ip, port)
        info = api.Session_pb2.CreateSessionInfo()
        info.username = c.username
        info.password = c.password
        info.session_inactivity_timeout = int(c.session_inactivity_timeout_ms)
        info.connection_inactivity_timeout = int(c.connection_inactivity_timeout_ms)
        manager = api.SessionManager(router)
        self._links.append((transport, router, None))
        manager.CreateSession(info)
        self._links[-1] = (transport, router, manager)
        return router

    def connect(self) -> None:
        """TCP + UDP sessions, service clients, and a check that this is a 7-actuator arm."""
        c = self.conn
        try:
            tcp = self._open(self.api.TCPTransport, c.tcp_port)
            udp = self._open(self.api.UDPTransport, c.udp_port)
            self.base = self.api.BaseClient(tcp)
            self.cyclic = self.api.BaseCyclicClient(udp)
            self._tcp_options = self.api.RouterClientSendOptions()
            self._tcp_options.timeout_ms = int(c.request_timeout_ms)
            self._udp_options = self.api.RouterClientSendOptions()
            self._udp_options.andForget = False
            self._udp_options.delay_ms = 0
            self._udp_options.timeout_ms = int(c.cyclic_timeout_ms)
            count = self._tcp("GetActuatorCount", self.base.GetActuatorCount).count
        except (*self.api.errors, OSError) as err:
            self.close()
            raise KortexError(f"cannot connect to the arm at {c.ip} (tcp {c.tcp_port}, udp {c.udp_port}): {err}") \
                from err
        if count != N_JOINTS:
            self.close()
            raise KortexError(f"the arm at {c.ip} reports {count} actuators; this bridge drives a 7-DoF Gen3")
        self.connected = True

    def close(self) -> list[str]:
        """Close both sessions and transports (best effort, idempotent); returns what failed."""
        errors: list[str] = []
        opts = self.api.RouterClientSendOptions()
        opts.timeout_ms = 1000
        for transport, _router, manager in reversed(self._links):
            if manager is not None:
                try:
                    manager.CloseSession(opts)
                except Exception as err:  # a dead link must not stop the other one from closing
                    errors.append(f"CloseSession: {err}")
            try:
                transport.disconnect()
            except Exception as err:
                errors.append(f"disconnect: {err}")
        self._links.clear()
        self.connected = False
        self.close_errors = errors
        return errors

    # -- calls --------------------------------------------------------------------------------------------------
    def _tcp(self, name: str, fn: Any, *args: Any) -> Any:
        with self._tcp_lock:
            try:
                return fn(*args)
            except self.api.errors as err:
                raise KortexError(f"{name} failed: {err}") from err

    def feedback(self) -> ArmFeedback:
        """RefreshFeedback over UDP (allowed in every servoing mode)."""
        try:
            fb = self.cyclic.RefreshFeedback(0, self._udp_options)
        except self.api.errors as err:
            raise KortexError(f"RefreshFeedback failed: {err}") from err
        return self._convert(fb)

    @staticmethod
    def _convert(fb: Any) -> ArmFeedback:
        acts = fb.actuators
        if len(acts) != N_JOINTS:
            raise KortexError(f"feedback has {len(acts)} actuators, expected {N_JOINTS}")
        return ArmFeedback(
            np.array([a.position for a in acts], dtype=np.float64),
            np.array([a.velocity for a in acts], dtype=np.float64),
            np.array([a.torque for a in acts], dtype=np.float64),
            int(fb.base.active_state), int(fb.base.fault_bank_a), int(fb.frame_id))

    def send_joint_speeds(self, deg_s: np.ndarray) -> None:
        """High-level joint speed command, one value per joint (deg/s)."""
        v = np.asarray(deg_s, dtype=np.float64)
        if v.shape != (N_JOINTS,) or not np.isfinite(v).all():
            raise ValueError(f"joint speeds must be {N_JOINTS} finite values, got {v.tolist()}")
        msg = self.api.Base_pb2.JointSpeeds()
        for i, value in enumerate(v):
            js = msg.joint_speeds.add()
            js.joint_identifier = i
            js.value = float(value)
            js.duration = 0
        self._tcp("SendJointSpeedsCommand", self.base.SendJointSpeedsCommand, msg)

    def stop(self) -> None:
        self._tcp("Stop", self.base.Stop)

    def emergency_stop(self) -> None:
        self._tcp("ApplyEmergencyStop", self.base.ApplyEmergencyStop)

    def clear_faults(self) -> None:
        self._tcp("ClearFaults", self.base.ClearFaults)

    def set_low_level(self, low_level: bool) -> None:
        info = self.api.Base_pb2.ServoingModeInformation()
        pb = self.api.Base_pb2
        info.servoing_mode = pb.LOW_LEVEL_SERVOING if low_level else pb.SINGLE_LEVEL_SERVOING
        self._tcp("SetServoingMode", self.base.SetServoingMode, info)

    def reach_joint_angles(self, deg: np.ndarray) -> None:
        """Start the arm's own reach-joint-angles action (completion: watch the feedback)."""
        d = np.asarray(deg, dtype=np.float64)
        if d.shape != (N_JOINTS,) or not np.isfinite(d).all():
            raise ValueError(f"joint angles must be {N_JOINTS} finite values, got {d.tolist()}")
        action = self.api.Base_pb2.Action()
        action.name = "koopman_control home"
        action.application_data = ""
        for i, value in enumerate(d):
            ja = action.reach_joint_angles.joint_angles.joint_angles.add()
            ja.joint_identifier = i
            ja.value = float(value)
        self._tcp("ExecuteAction", self.base.ExecuteAction, action)

    def start_cyclic(self, seed_deg: np.ndarray) -> None:
        """Build the cyclic command from measured positions; call before switching to low-level servoing."""
        cmd = self.api.BaseCyclic_pb2.Command()
        for p in np.asarray(seed_deg, dtype=np.float64):
            a = cmd.actuators.add()
            a.flags = 1  # servoing
            a.position = float(p)
            a.velocity = 0.0
        cmd.frame_id = 0
        self._command = cmd

    def refresh(self, position_deg: np.ndarray, frame_id: int) -> ArmFeedback:
        """One low-level frame: positions in [0, 360) deg; ``frame_id`` (16 bit) lets the arm drop stale frames."""
        p = np.asarray(position_deg, dtype=np.float64)
        if self._command is None:
            raise KortexError("refresh before start_cyclic: the command was never seeded from feedback")
        if p.shape != (N_JOINTS,) or not np.isfinite(p).all() or ((p < 0) | (p >= 360)).any():
            raise ValueError(f"cyclic positions must be {N_JOINTS} finite values in [0, 360) deg, got {p.tolist()}")
        cmd = self._command
        cmd.frame_id = int(frame_id) & 0xFFFF
        for a, value in zip(cmd.actuators, p, strict=True):
            a.position = float(value)
            a.command_id = cmd.frame_id
        try:
            fb = self.cyclic.Refresh(cmd, 0, self._udp_options)
        except self.api.errors as err:
            raise KortexError(f"Refresh failed: {err}") from err
        return self._convert(fb)
