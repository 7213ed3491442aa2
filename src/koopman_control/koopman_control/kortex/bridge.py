"""The Kortex bridge's core (no rclpy): feedback in, action chunks out, the watchdog always armed.

Control modes
  * ``speed`` (default): a feedback thread reads ``RefreshFeedback`` over UDP at the feedback rate; a command
    thread at ``command_rate`` (tens of Hz, the TCP cycle is about 25 ms) turns the chunk into joint speeds:
    the chunk's own velocity plus a proportional correction towards its interpolated position.
  * ``cyclic``: one 1 kHz thread sends low-level position frames (``Refresh``), seeded from measured
    feedback, frame id incremented every cycle; servoing goes to low level on entry and back to single
    level on exit (also on errors, shutdown and Ctrl-C).

Every command goes through :class:`~koopman_control.kortex.limits.CommandShaper` (velocity, acceleration and
position limits; non-finite -> stop). Chunks go through the stack's :class:`ChunkExecutor` with the arm's
:class:`~koopman_control.core.chunk.CommandChecks` (shape, NaN, timing, position limits, age, episode, and
a start near where the arm is), the same checks the sim node applies. Watchdog: no accepted chunk for
``watchdog_timeout`` -> zero speeds and ``Stop`` (speed mode) or hold the measured position (cyclic mode),
until a fresh chunk arrives; the hold command (a chunk without points) does the same at once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np

from koopman_control.core.chunk import ActionChunk, ChunkExecutor, CommandChecks, ExecState
from koopman_control.core.observation import NS
from koopman_control.core.realtime import PeriodicLoop
from koopman_control.core.stats import SampleStats
from koopman_control.kortex import units
from koopman_control.kortex.client import ArmFeedback, KortexClient, KortexError
from koopman_control.kortex.limits import CommandShaper, JointLimits, validate_pose

ARMSTATE_IN_FAULT = 4  # Base_pb2.ARMSTATE_IN_FAULT (same value in the stand-in)
CONTROL_MODES = ("speed", "cyclic")


class BridgeState(StrEnum):
    STARTING = "starting"
    RUNNING = "running"  # following chunks (or stopped by the watchdog, waiting for one)
    FAULT = "fault"  # emergency stop, arm fault or lost feedback: no motion until clear_faults
    HOMING = "homing"  # the arm's own reach-joint-angles action is running
    CLOSED = "closed"


@dataclass(frozen=True)
class BridgeConfig:
    control_mode: str = "speed"
    feedback_rate: float = 500.0  # Hz, joint_states
    command_rate: float = 40.0  # Hz, high-level speed commands
    cyclic_rate: float = 1000.0  # Hz, low-level frames
    watchdog_timeout: float = 0.1  # s without an accepted chunk -> stop
    feedback_timeout: float = 0.1  # s without feedback -> stop and drop the plan until it is fresh again
    position_gain: float = 4.0  # 1/s, speed mode correction towards the chunk
    interpolation: str = "linear"
    max_start_deviation: float = 0.35  # rad: a chunk must start this close to the measured position
    max_chunk_age: float = 0.1  # s: a chunk must answer an observation at most this old
    home_q: tuple[float, ...] = ()
    home_timeout: float = 30.0
    home_tolerance: float = 0.01  # rad
    unwrap_reference: tuple[float, ...] = ()  # first-sample reference of the continuous joints

    def __post_init__(self) -> None:
        if self.control_mode not in CONTROL_MODES:
            raise ValueError(f"control_mode must be one of {', '.join(CONTROL_MODES)}, got {self.control_mode!r}")
        for name in ("feedback_rate", "command_rate", "cyclic_rate", "watchdog_timeout", "feedback_timeout",
                     "position_gain", "max_start_deviation", "max_chunk_age", "home_timeout", "home_tolerance"):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and np.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a positive number, got {v!r}")
        if self.feedback_rate > 1000 or self.cyclic_rate > 1000 or self.command_rate > 1000:
            raise ValueError("rates above 1000 Hz are beyond what the arm serves")
        if self.watchdog_timeout > 1.0:
            raise ValueError(f"watchdog_timeout above 1 s is not a watchdog, got {self.watchdog_timeout}")


@dataclass
class BridgeCounters:
    feedback_errors: int = 0
    feedback_stale: int = 0  # times feedback went older than feedback_timeout (arm stopped meanwhile)
    command_errors: int = 0
    watchdog_stops: int = 0
    faults: int = 0
    last_error: str = ""
    errors: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class JointSample:
    stamp_ns: int
    q: np.ndarray  # rad (continuous joints unwrapped)
    qd: np.ndarray  # rad/s
    effort: np.ndarray  # N m


class KortexBridge:
    """Owns the client's sessions and the control threads; thread-safe entry points for the ROS node."""

    def __init__(self, client: KortexClient, limits: JointLimits, config: BridgeConfig,
                 on_feedback: Callable[[JointSample], None] | None = None,
                 clock: Callable[[], int] = time.time_ns) -> None:
        self.client = client
        self.limits = limits
        self.cfg = config
        self.on_feedback = on_feedback
        self.clock = clock
        self.executor = ChunkExecutor(CommandChecks(
            limits.lower, limits.upper, watchdog_timeout=config.watchdog_timeout,
            max_start_deviation=config.max_start_deviation, max_chunk_age=config.max_chunk_age,
            interpolation=config.interpolation))
        self.shaper = CommandShaper(limits)
        self.counters = BridgeCounters()
        self.state = BridgeState.STARTING
        self.fault_reason = ""
        self.lock = threading.RLock()
        self.home_q = validate_pose(config.home_q, limits, "home_q") if config.home_q else None
        ref = np.asarray(config.unwrap_reference or np.zeros(7), dtype=np.float64)
        if ref.shape != (7,) or not np.isfinite(ref).all():
            raise ValueError("unwrap_reference must be 7 finite angles (rad)")
        self._ref = ref
        self.latest: JointSample | None = None
        self.feedback_age_ms = SampleStats()
        self.watchdog_latency_ms = SampleStats()  # last chunk received -> stop command sent
        self.last_command = np.zeros(7)  # rad/s (speed) or rad (cyclic)
        self._cmd_pos: np.ndarray | None = None
        self._frame_id = 0
        self._stopped_sent = True
        self._low_level = False
        self._fb_loop: PeriodicLoop | None = None
        self._cmd_loop: PeriodicLoop | None = None
        self._cyc_loop: PeriodicLoop | None = None
        self._publish_every = 1
        self._cycle = 0
        self._last_chunk_ns = 0
        self._stale = False
        self._closed = False

    # -- lifecycle -------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Connect, read the first feedback (unwrap reference), hold there, start the threads."""
        self.client.connect()
        try:
            fb = self.client.feedback()
            self._ingest(fb)
            if fb.active_state == ARMSTATE_IN_FAULT or fb.fault_bank_a:
                self._fault(f"arm reports a fault at start-up (fault bank {fb.fault_bank_a:#x}); clear_faults")
            else:
                self.state = BridgeState.RUNNING
            assert self.latest is not None
            self.executor.reset(self.clock(), self.latest.q)
            self._start_loops()
        except BaseException:
            self.close()
            raise

    def close(self) -> list[str]:
        """Stop threads, stop the arm, leave low-level servoing, close sessions. Idempotent."""
        with self.lock:
            if self._closed:
                return []
            self._closed = True
            self.state = BridgeState.CLOSED
        self._stop_loops()
        errors: list[str] = []
        if self.client.connected:
            for what, fn in (("servoing", self._leave_low_level), ("stop", self.client.stop)):
                try:
                    fn()
                except (KortexError, ValueError) as err:
                    errors.append(f"{what}: {err}")
        errors += self.client.close()
        return errors

    def _start_loops(self) -> None:
        cyclic = self.cfg.control_mode == "cyclic" and self.state is BridgeState.RUNNING
        if cyclic:
            self._enter_low_level()
            self._publish_every = max(1, round(self.cfg.cyclic_rate / self.cfg.feedback_rate))
            self._cyc_loop = PeriodicLoop(self.cfg.cyclic_rate, self._cyclic_cycle, name="kortex-cyclic")
            self._cyc_loop.start()
        else:
            self._fb_loop = PeriodicLoop(self.cfg.feedback_rate, self._feedback_cycle, name="kortex-feedback")
            self._fb_loop.start()
            if self.cfg.control_mode == "speed":
                self._cmd_loop = PeriodicLoop(self.cfg.command_rate, self._command_cycle, name="kortex-command")
                self._cmd_loop.start()

    def _stop_loops(self) -> None:
        for loop in (self._cmd_loop, self._cyc_loop, self._fb_loop):
            if loop is not None:
                loop.stop()
        self._cmd_loop = self._cyc_loop = self._fb_loop = None

    def loops_alive(self) -> bool:
        loops = [lp for lp in (self._cmd_loop, self._cyc_loop, self._fb_loop) if lp is not None]
        return bool(loops) and all(lp.running for lp in loops)

    def loop_errors(self) -> list[str]:
        return [f"{lp.name}: {lp.error!r}" for lp in (self._cmd_loop, self._cyc_loop, self._fb_loop)
                if lp is not None and lp.error is not None]

    def rate_summary(self) -> dict[str, Any]:
        loop = self._cyc_loop or self._fb_loop
        return {} if loop is None else {**loop.rate.summary(), "overruns": loop.overruns, "skipped": loop.skipped}

    # -- feedback ----------------------------------------------------------------------------------------------
    def _ingest(self, fb: ArmFeedback) -> JointSample:
        now = self.clock()
        prev = self.latest.q if self.latest is not None else self._ref
        q = units.kortex_deg_to_rad(fb.position_deg, prev, self.limits.continuous)
        qd = units.deg_s_to_rad_s(fb.velocity_deg_s)
        if not np.isfinite(qd).all():
            raise KortexError(f"non-finite joint velocity from the arm: {fb.velocity_deg_s.tolist()}")
        sample = JointSample(now, q, qd, fb.torque_nm)
        self.latest = sample
        if (fb.active_state == ARMSTATE_IN_FAULT or fb.fault_bank_a) and self.state is BridgeState.RUNNING:
            self._fault(f"arm in fault (fault bank {fb.fault_bank_a:#x})")
        return sample

    def _feedback_cycle(self, skipped: int) -> None:
        try:
            sample = self._ingest(self.client.feedback())
        except (KortexError, ValueError) as err:
            self._error("feedback", err)
            return
        if self.on_feedback is not None:
            self.on_feedback(sample)
        if self._cmd_loop is not None:
            self._watchdog(sample.stamp_ns)

    def _watchdog(self, now: int) -> None:
        """Checked at the feedback rate, not only at the command rate: a silent source stops the arm within
        ``watchdog_timeout`` plus one feedback period."""
        if self.executor.state is not ExecState.TRACKING or now - self._last_chunk_ns <= self.executor.timeout_ns:
            return
        with self.lock:
            if self.state is BridgeState.RUNNING and self.executor.state is ExecState.TRACKING and self.latest:
                self.executor.command(now, self.latest.q)
                if self.executor.state is not ExecState.TRACKING:
                    self._on_watchdog(now)
                    self._send_stop(now)

    def _on_watchdog(self, now: int) -> None:
        self.counters.watchdog_stops += 1
        self.watchdog_latency_ms.add((now - self._last_chunk_ns) / 1e6)

    def _feedback_fresh(self, now: int) -> JointSample | None:
        s = self.latest
        if s is None:
            return None
        age = now - s.stamp_ns
        self.feedback_age_ms.add(age / 1e6)
        if age > self.cfg.feedback_timeout * NS:
            # Blind: stop (the caller sends zero speeds) and drop the plan, so motion resumes only with a chunk
            # computed from fresh feedback. Not a latched fault: a busy host or a lost packet burst recovers.
            if not self._stale:
                self._stale = True
                self.counters.feedback_stale += 1
                self.counters.last_error = f"no arm feedback for {age / 1e6:.0f} ms: arm stopped"
                self.executor.reset(now, s.q)
            return None
        self._stale = False
        return s

    # -- speed mode ---------------------------------------------------------------------------------------------
    def _command_cycle(self, skipped: int) -> None:
        now = self.clock()
        dt = 1.0 / self.cfg.command_rate
        with self.lock:
            if self.state is not BridgeState.RUNNING:
                return
            s = self._feedback_fresh(now)
            if s is None:
                self._send_stop(now)
                return
            was_tracking = self.executor.state is ExecState.TRACKING
            self.executor.command(now, s.q)  # runs the watchdog (TRACKING -> HOLD)
            chunk = self.executor.chunk
            if self.executor.state is not ExecState.TRACKING or chunk is None:
                if was_tracking:
                    self._on_watchdog(now)
                self._send_stop(now)
                return
            ref = self.executor.sample(chunk, now)
            ahead = self.executor.sample(chunk, now + round(dt * NS))
            desired = (ahead - ref) / dt + self.cfg.position_gain * (ref - s.q)
            v = self.shaper.shape(desired, s.q, dt)
            # Sent under the lock: the watchdog (feedback thread) cannot slip a Stop in before a stale command.
            try:
                self.client.send_joint_speeds(units.rad_s_to_deg_s(v))
                self.last_command = v
                self._stopped_sent = False
            except (KortexError, ValueError) as err:
                self._error("command", err)

    def _send_stop(self, now: int) -> None:
        """Zero speeds every cycle while stopped (a lost packet cannot leave the arm moving) plus one Stop."""
        self.shaper.reset()
        self.last_command = np.zeros(7)
        try:
            self.client.send_joint_speeds(np.zeros(7))
            if not self._stopped_sent:
                self.client.stop()
                self._stopped_sent = True
        except KortexError as err:
            self._error("command", err)

    # -- cyclic mode --------------------------------------------------------------------------------------------
    def _enter_low_level(self) -> None:
        fb = self.client.feedback()
        s = self._ingest(fb)
        self._cmd_pos = s.q.copy()
        self.shaper.reset()
        self.client.start_cyclic(fb.position_deg)
        self.client.set_low_level(True)
        self._low_level = True
        self.executor.reset(self.clock(), s.q)

    def _leave_low_level(self) -> None:
        if self._low_level:
            self._low_level = False
            self.client.set_low_level(False)

    def _cyclic_cycle(self, skipped: int) -> None:
        now = self.clock()
        dt = 1.0 / self.cfg.cyclic_rate * (1 + skipped)
        self._cycle += 1
        if self.state is not BridgeState.RUNNING or self._cmd_pos is None:
            # Faulted (no frames are accepted now): feedback only, at the feedback rate.
            if self._cycle % self._publish_every == 0:
                self._feedback_cycle(skipped)
            return
        with self.lock:
            s = self.latest
            assert s is not None
            was_tracking = self.executor.state is ExecState.TRACKING
            target = self.executor.command(now, s.q)
            if was_tracking and self.executor.state is not ExecState.TRACKING:
                self._on_watchdog(now)
            if self.executor.state is not ExecState.TRACKING or target is None:
                # Hold: the measured position at the stop (the executor's hold pose), approached without a jump.
                target = self._cmd_pos if target is None else target
            self._cmd_pos = self.shaper.step_position(target, self._cmd_pos, dt)
            self._frame_id = (self._frame_id + 1) & 0xFFFF
            # Sent under the lock, so a re-seed (new episode, clear_faults) can never be followed by a frame
            # computed before it.
            try:
                fb = self.client.refresh(units.rad_to_kortex_deg(self._cmd_pos), self._frame_id)
                sample = self._ingest(fb)
                self.last_command = self._cmd_pos
            except (KortexError, ValueError) as err:
                self._error("cyclic", err)
                return
        if self.on_feedback is not None and self._cycle % self._publish_every == 0:
            self.on_feedback(sample)

    # -- chunks -------------------------------------------------------------------------------------------------
    def submit(self, chunk: ActionChunk, now_ns: int) -> tuple[bool, str]:
        """Validate and take a chunk (:class:`CommandChecks`); refused while not running or without feedback."""
        with self.lock:
            if self.state is not BridgeState.RUNNING:
                return self.executor.reject(f"not running: bridge is {self.state.value}")
            if self.latest is None:
                return self.executor.reject("not running: no arm feedback yet")
            ok, reason = self.executor.submit(chunk, now_ns, self.latest.q)
            if ok:
                self._last_chunk_ns = int(now_ns)
            return ok, reason

    def hold(self, now_ns: int, command: bool = True) -> None:
        """Stop where the arm is, now (as the watchdog would, without waiting for it): the hold command, or the
        task's own hold between episodes (``command`` False, not counted as a command)."""
        with self.lock:
            if self.state is not BridgeState.RUNNING or self.latest is None:
                return
            self.executor.hold(now_ns, self.latest.q, command)
            if self._cmd_loop is not None:  # speed mode; the cyclic loop holds the executor's pose by itself
                self._send_stop(now_ns)

    # -- services -----------------------------------------------------------------------------------------------
    def emergency_stop(self) -> str:
        with self.lock:
            try:
                self.client.emergency_stop()
            finally:
                self._fault("emergency stop requested")
                self._low_level = False  # the arm leaves low-level servoing when it faults
        return "emergency stop applied; call clear_faults to resume"

    def clear_faults(self) -> str:
        with self.lock:
            if self.state is BridgeState.CLOSED:
                raise KortexError("bridge is closed")
            self.client.clear_faults()
            self._stop_loops()
            fb = self.client.feedback()
            self._ingest(fb)
            if fb.active_state == ARMSTATE_IN_FAULT or fb.fault_bank_a:
                self._start_loops()
                raise KortexError(f"arm still in fault after ClearFaults (fault bank {fb.fault_bank_a:#x})")
            self.state = BridgeState.RUNNING
            self.fault_reason = ""
            assert self.latest is not None
            self.executor.reset(self.clock(), self.latest.q)
            self._stopped_sent = True
            self._start_loops()
        return "faults cleared; holding position until the next chunk"

    def go_home(self, home_q: np.ndarray | None = None, wait: bool = True) -> str:
        """Run the arm's reach-joint-angles action to the home pose (leaving low-level servoing meanwhile)."""
        goal = self.home_q if home_q is None else validate_pose(home_q, self.limits, "home pose")
        if goal is None:
            raise ValueError("no home pose configured (parameter home_q)")
        with self.lock:
            if self.state is not BridgeState.RUNNING:
                raise KortexError(f"cannot go home while {self.state.value}" +
                                  (f" ({self.fault_reason})" if self.fault_reason else ""))
            self.state = BridgeState.HOMING
        try:
            self._stop_loops()
            self._leave_low_level()
            self.client.stop()
            self._fb_loop = PeriodicLoop(self.cfg.feedback_rate, self._feedback_cycle, name="kortex-feedback")
            self._fb_loop.start()
            self.client.reach_joint_angles(units.rad_to_kortex_deg(goal))
            deadline = time.monotonic() + self.cfg.home_timeout
            reached = False
            while wait and time.monotonic() < deadline:
                s = self.latest
                if s is not None and np.max(np.abs(units.wrap_to_pi(s.q - goal))) < self.cfg.home_tolerance:
                    reached = True
                    break
                time.sleep(0.02)
            if wait and not reached:
                self.client.stop()
                raise KortexError(f"home pose not reached within {self.cfg.home_timeout} s; arm stopped")
        finally:
            with self.lock:
                if self.state is BridgeState.HOMING:
                    self.state = BridgeState.RUNNING
                    if self.latest is not None:
                        self.executor.reset(self.clock(), self.latest.q)
                    self._stopped_sent = True
            self._stop_loops()
            if self.state is not BridgeState.CLOSED:
                self._start_loops()
        return "home pose reached" if wait else "moving home"

    def reseed(self, episode: int | None = None) -> None:
        """The arm was moved outside this bridge (the stand-in's scene reset): re-read the feedback, forget the
        plan, refuse older chunks (and, given ``episode``, chunks of other episodes), and restart low-level
        commands from the measured position."""
        with self.lock:
            if self.state in (BridgeState.CLOSED, BridgeState.HOMING):
                return
            try:
                s = self._ingest(self.client.feedback())
            except (KortexError, ValueError) as err:
                self._error("feedback", err)
                return
            self.executor.reset(self.clock(), s.q, episode)
            self.shaper.reset()
            if self._cmd_pos is not None:
                self._cmd_pos = s.q.copy()

    # -- faults -------------------------------------------------------------------------------------------------
    def _fault(self, reason: str) -> None:
        with self.lock:
            if self.state is BridgeState.FAULT:
                return
            if self.state in (BridgeState.RUNNING, BridgeState.STARTING):
                self.state = BridgeState.FAULT
                self.fault_reason = reason
                self.counters.faults += 1
                self.counters.last_error = reason
                if self.latest is not None:
                    self.executor.reset(self.clock(), self.latest.q)
        # Stop the motion; in low level hold the command where it is (the cyclic loop stops sending).
        try:
            if not self._low_level:
                self.client.send_joint_speeds(np.zeros(7))
            self.client.stop()
        except (KortexError, ValueError):
            pass

    def _error(self, where: str, err: BaseException) -> None:
        c = self.counters
        if where == "feedback":
            c.feedback_errors += 1
        else:
            c.command_errors += 1
        c.last_error = f"{where}: {err}"
        c.errors.append(c.last_error)
        del c.errors[:-20]

    def status(self) -> dict[str, Any]:
        ex = self.executor
        s = self.latest
        return {
            "state": self.state.value, "fault": self.fault_reason, "control_mode": self.cfg.control_mode,
            "executor": ex.state.value, "chunks_accepted": ex.counters.accepted,
            "chunks_rejected": ex.counters.rejected, "holds": ex.counters.holds,
            "refused_by_cause": dict(ex.counters.reject_reasons),
            "last_reject": ex.counters.last_reject_reason, "watchdog_stops": self.counters.watchdog_stops,
            "feedback_errors": self.counters.feedback_errors,
            "feedback_stale": self.counters.feedback_stale, "command_errors": self.counters.command_errors,
            "last_error": self.counters.last_error, "frame_id": self._frame_id,
            "velocity_clipped": self.shaper.counters.velocity_clipped,
            "acceleration_clipped": self.shaper.counters.acceleration_clipped,
            "position_braked": self.shaper.counters.position_braked,
            "nonfinite_commands": self.shaper.counters.nonfinite,
            "q": None if s is None else s.q.round(4).tolist(),
        }
