"""The control stack's plain-Python cores, without ROS: observations and episode boundaries, chunk execution
and the arm's command checks, fallback supervision, statistics, fault logs, the policy runner on real ONNX
files, the sim driver, and the stack description."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from koopman_control.contracts import resolve_contract
from koopman_control.core.chunk import ActionChunk, ChunkExecutor, CommandChecks, ExecState, published_points
from koopman_control.core.episodes import EpisodeSequencer, EpisodeTimeline, Phase
from koopman_control.core.faultlog import FaultLog
from koopman_control.core.image import ImageNormalizer, ImageObservationBuilder, decode, resize_bilinear
from koopman_control.core.observation import NS, InputStatus, JointBounds, ObservationHistory, StateObservationBuilder
from koopman_control.core.stats import RateMeter, SampleStats
from koopman_control.core.supervisor import HEALTHY, FallbackSupervisor, Health, Mode

JOINTS = [f"joint_{i}" for i in range(1, 8)]
MS = 1_000_000
T0 = 1_700_000_000 * NS


# -- observations ----------------------------------------------------------------------------------------------
REACH = resolve_contract("gen3_reach_obstacle")


def _task(b: StateObservationBuilder, stamp: int = T0 - MS, y: float = 0.0) -> None:
    b.set_vector("target", stamp, [0.6, y, 0.17])
    b.set_vector("pillar", stamp, [0.41, y, 0.15])


def _builder(rate: float = 10.0, steps: int = 2, spacing: float | None = None,
             bounds: JointBounds | None = None) -> StateObservationBuilder:
    b = StateObservationBuilder(REACH.observation, steps, rate, max_state_age_s=0.05, history_spacing_s=spacing,
                                bounds=bounds)
    _task(b)
    return b


def _feed(b: StateObservationBuilder, t_ns: int, q: float = 0.1, names: list[str] | None = None):
    return b.on_joint_state(names or JOINTS, [q] * 7, [0.0] * 7, t_ns, t_ns + MS)


def test_observations_at_policy_rate_from_500hz_samples() -> None:
    b = _builder()
    out = [o for k in range(500) if (o := _feed(b, T0 + k * 2 * MS, q=k * 1e-3)) is not None]
    assert len(out) == 10  # one second at 10 Hz
    first = out[0]
    assert first.padded and first.history.shape == (2, 20) and np.array_equal(first.history[0], first.history[1])
    stamps = np.array([o.stamp_ns for o in out])
    assert np.all(np.diff(stamps) == 100 * MS)  # ticks on the robot's own sample grid, no drift
    o = out[3]
    assert o.stamps_ns[1] - o.stamps_ns[0] == 100 * MS
    np.testing.assert_allclose(o.history[1, 14:], [0.6, 0.0, 0.17, 0.41, 0.0, 0.15], atol=1e-6)
    assert o.history[1, 0] > o.history[0, 0]  # newest last


def test_a_faster_controller_keeps_the_trained_history_spacing() -> None:
    """At 100 Hz ticks with history_spacing 0.1 s, each observation holds the sample from 0.1 s earlier, as
    the 10 Hz model was trained; at an episode start it is padded with the first sample."""
    b = _builder(100.0, spacing=0.1)
    out = [o for k in range(250) if (o := _feed(b, T0 + k * 2 * MS, q=k * 1e-3)) is not None]
    assert len(out) == 50  # half a second at 100 Hz
    assert np.all(np.diff([o.stamp_ns for o in out]) == 10 * MS)
    first = out[0].stamp_ns
    assert out[0].padded and all(o.stamps_ns[0] == first for o in out[:10])  # the first 0.1 s: episode start
    assert all(o.stamps_ns[1] - o.stamps_ns[0] == 100 * MS for o in out[10:])
    assert np.allclose(out[20].history[0, :7], out[10].history[1, :7])
    with pytest.raises(ValueError, match="whole multiple"):
        StateObservationBuilder(REACH.observation, 2, 15.0, history_spacing_s=0.1)


def test_a_late_sample_at_100hz_does_not_empty_the_history() -> None:
    """Feedback that pauses 9 ms puts two ticks 18 ms apart: the 0.1 s history must survive it, its steps
    still the samples nearest 0.1 s apart, and the ticks after it keep coming."""
    b = _builder(100.0, spacing=0.1)
    stamps = [T0 + k * 2 * MS for k in range(400) if not 200 <= k < 204]  # no sample from 0.400 to 0.408 s
    out = [(t, o) for t in stamps if (o := _feed(b, t, q=(t - T0) / NS)) is not None]
    assert b.history.gaps == 0 and len(out) == 80
    for t, o in out[20:]:
        assert abs(int(o.stamps_ns[1] - o.stamps_ns[0]) - 100 * MS) <= 10 * MS, (t - T0) / MS


def test_plan_follower_on_the_models_time_grid() -> None:
    from koopman_control.core.plan import PlanFollower

    points = np.arange(15, dtype=float)[:, None] * np.ones((1, 7))
    f = PlanFollower()
    assert f.remaining(T0, "a", 8) is None  # no plan yet
    f.adopt(points, 0.1, T0, "a")
    # 10 Hz ticks (with a sample's jitter): tick k publishes point k at once, the rest at their own times.
    for k in range(8):
        t = T0 + k * 100 * MS + (MS if k % 2 else -MS) * (k > 0)
        offsets, rest = f.remaining(t, "a", 8)
        assert rest[0, 0] == k and offsets[0] == 0
        assert np.allclose(offsets[1:], (T0 + np.arange(k + 1, 15) * 100 * MS - t) / NS)
    assert f.remaining(T0 + 800 * MS, "a", 8) is None  # 8 points executed: a new plan is due
    assert f.remaining(T0 + 100 * MS, "b", 8) is None  # another episode or mode
    # 100 Hz ticks follow the same plan for the same time, point k active from T0 + k * 0.1 s.
    actives = [f.remaining(T0 + k * 10 * MS, "a", 8) for k in range(80)]
    assert all(a is not None for a in actives[:79])
    assert [a[1][0, 0] for a in actives[:79:10]] == list(range(8))
    assert f.remaining(T0 + 10 * MS, "a", 1) is None  # execute_steps 1: a new plan at every tick
    # 100 Hz ticks landing a feedback sample (2 ms) early or late: no point starts before its grid time but
    # for that jitter (a tick 10 ms before it, the previous tick, never starts it).
    f100 = PlanFollower(tick_period_s=0.01)
    f100.adopt(points, 0.1, T0, "a")
    for k in range(1, 79):
        t = T0 + k * 10 * MS + (2 * MS if k % 2 else -2 * MS)
        due = (k * 10 + 2) // 100  # the point whose grid time the tick has reached, within the jitter
        assert f100.remaining(t, "a", 8)[1][0, 0] == due, k


def test_runner_refuses_a_history_spaced_unlike_its_training() -> None:
    import tempfile
    from pathlib import Path

    from koopman_control.core.policy_runner import PolicyRunner
    from koopman_control.testing import export_untrained

    with tempfile.TemporaryDirectory() as d:
        r = PolicyRunner.load(str(export_untrained("bc", Path(d) / "bc.onnx")))
    m = r.meta
    hist = np.tile((np.asarray(m.obs_low) + np.asarray(m.obs_high)) / 2, (m.n_obs_steps, 1)).astype(np.float32)
    dt = round(m.control_dt * NS)
    assert r.step(hist, m.obs_names, stamps_ns=np.array([T0, T0 + dt + 2 * MS])).health.ok
    assert r.step(hist, m.obs_names, stamps_ns=np.array([T0, T0])).health.ok  # padded at an episode start
    res = r.step(hist, m.obs_names, stamps_ns=np.array([T0, T0 + dt // 10]))
    assert not res.health.ok and "history_period" in res.health.reason and res.chunk is None
    # ... unless its older step is the episode's first sample (the first control period of an episode)
    assert r.step(hist, m.obs_names, stamps_ns=np.array([T0, T0 + dt // 10]), episode_start_ns=T0).health.ok


def test_joint_order_follows_names_not_message_order() -> None:
    b = _builder()
    names = list(reversed(JOINTS))
    obs = b.on_joint_state(names, [float(i) for i in range(7)], [0.0] * 7, T0, T0)
    np.testing.assert_allclose(obs.history[-1, :7], [6, 5, 4, 3, 2, 1, 0])


@pytest.mark.parametrize("bad", ["nan", "missing_joint", "stale", "future", "no_velocity"])
def test_bad_input_stops_the_flow_and_is_reported(bad: str) -> None:
    b = _builder()
    assert _feed(b, T0) is not None
    t = T0 + 100 * MS
    if bad == "nan":
        r = b.on_joint_state(JOINTS, [np.nan] + [0.0] * 6, [0.0] * 7, t, t)
    elif bad == "missing_joint":
        r = b.on_joint_state(JOINTS[:6], [0.0] * 6, [0.0] * 6, t, t)
    elif bad == "stale":
        r = b.on_joint_state(JOINTS, [0.0] * 7, [0.0] * 7, t, t + 200 * MS)
    elif bad == "future":
        r = b.on_joint_state(JOINTS, [0.0] * 7, [0.0] * 7, t + 500 * MS, t)
    else:
        r = b.on_joint_state(JOINTS, [0.0] * 7, [], t, t)
    assert r is None
    assert b.status in (InputStatus.INVALID, InputStatus.STALE) and b.reason and b.faults == 1
    assert len(b.history) == 0  # nothing old is kept to be re-sent
    # Recovery needs a full fresh history (no padding mid-episode).
    assert _feed(b, t + 2 * MS) is None
    assert b.status is InputStatus.OK
    assert _feed(b, t + 102 * MS) is not None


def test_watchdog_marks_silence_stale_and_waits_for_task() -> None:
    b = StateObservationBuilder(REACH.observation, 2, 10.0, max_state_age_s=0.05)
    assert _feed(b, T0) is None and b.status is InputStatus.WAITING  # no target/pillar yet
    assert "task/target" in b.reason  # the missing input and its source
    _task(b, T0 + MS)
    assert _feed(b, T0 + 2 * MS) is not None
    assert b.check(T0 + 30 * MS) is InputStatus.OK
    assert b.check(T0 + 80 * MS) is InputStatus.STALE
    b.set_vector("target", T0 + 90 * MS, [np.nan, 0, 0])
    assert b.status is InputStatus.INVALID and b.take_events()[-1][0] == "target invalid"


def test_episode_change_restarts_padded_history_and_tick_grid() -> None:
    b = _builder()
    _feed(b, T0)
    _feed(b, T0 + 100 * MS)
    b.announce_episode(4, T0 + 130 * MS)
    assert _feed(b, T0 + 120 * MS) is None and b.status is InputStatus.WAITING  # episode over, reset pending
    assert _feed(b, T0 + 130 * MS) is None  # episode 4's own task inputs have not come yet
    _task(b, T0 + 130 * MS, y=0.05)
    o = _feed(b, T0 + 132 * MS)  # right after the reset, off the old grid: emitted at once, padded
    assert o is not None and o.padded and o.episode == 4 and o.history[-1, 15] == pytest.approx(0.05)
    assert _feed(b, T0 + 200 * MS) is None  # the grid re-anchored at the reset
    assert _feed(b, T0 + 232 * MS) is not None


def test_samples_overtaking_their_episodes_announcement_never_mix_into_one_history() -> None:
    """In separate processes a sample of the new episode can arrive before its announcement, and the new task
    inputs after the first samples: every sample and input still goes to the episode its stamp falls in."""
    b = _builder()
    out = [o for k in range(50) if (o := _feed(b, T0 + k * 2 * MS, q=0.1)) is not None]
    assert out and all(o.episode == 0 for o in out)
    start = T0 + 100 * MS
    late = [_feed(b, start + k * 2 * MS, q=-0.3) for k in range(5)]  # episode 1's samples, not yet announced
    b.announce_episode(1, start)  # the announcement arrives late: the history they went into is dropped
    assert len(b.history) == 0 and b.episode == 1
    assert all(o is None or o.episode == 0 for o in late)
    assert _feed(b, start + 12 * MS, q=-0.3) is None  # episode 0's target is not episode 1's
    _task(b, start, y=0.04)  # the new target, stamped with the episode's start, arrives after the samples
    o = _feed(b, start + 14 * MS, q=-0.3)
    assert o is not None and o.episode == 1 and o.padded
    assert np.all(o.history[:, 0] == pytest.approx(-0.3)) and o.history[-1, 15] == pytest.approx(0.04)
    assert b.timeline.episode_at(start - 1) == 0 and b.timeline.episode_at(start) == 1


def test_implausible_samples_stop_the_flow_once_per_cause() -> None:
    from koopman_sim import gen3

    bounds = JointBounds(np.array(gen3.JOINT_LOWER), np.array(gen3.JOINT_UPPER), np.array(gen3.VELOCITY_LIMITS))
    b = _builder(bounds=bounds)
    q = np.array(gen3.HOME_Q)
    t = T0
    assert b.on_joint_state(JOINTS, q, np.zeros(7), t, t) is not None
    cases = {"implausible position": (q + np.r_[0, 1e9, 0, 0, 0, 0, 0], np.zeros(7)),
             "implausible velocity": (q, np.r_[0, 0, 50.0, 0, 0, 0, 0]),
             "jump": (q + np.r_[0, 0, 0, 0.5, 0, 0, 0], np.zeros(7))}
    for cause, (qq, qd) in cases.items():
        t += 2 * MS
        assert b.on_joint_state(JOINTS, qq, qd, t, t) is None
        assert b.status is InputStatus.INVALID and b.cause == cause, b.reason
        t += 2 * MS
        assert b.on_joint_state(JOINTS, q, np.zeros(7), t, t) is None and b.status is InputStatus.OK
    assert [c for c, _ in b.take_events()] == list(cases) and b.take_events() == []


def test_fault_log_counts_every_occurrence_and_logs_once_per_second_per_cause() -> None:
    now = [0.0]
    log = FaultLog(interval_s=1.0, clock=lambda: now[0])
    lines = []
    for k in range(200):  # 2 s of a bad sample every 10 ms, two causes
        now[0] = k * 0.01
        for cause in ("nan", "stale"):
            if (line := log.report(cause, f"{cause} input")) is not None:
                lines.append((cause, line))
    assert log.counts() == {"nan": 200, "stale": 200} and log.total() == 400
    assert [c for c, _ in lines] == ["nan", "stale", "nan", "stale"]
    assert lines[0][1] == "nan input" and "100 times since the last report, 101 in all" in lines[2][1]


def test_episode_sequencer_announces_ahead_and_starts_the_clock_at_the_first_chunk() -> None:
    seq = EpisodeSequencer(seed=2, reset_delay_s=0.1, start_timeout_s=1.0)
    ann = seq.schedule(T0)
    assert ann.episode == 1 and ann.start_ns == T0 + 100 * MS and ann.seed == 2 * 100_003 + 1
    assert seq.due(T0 + 99 * MS) is None and seq.due(T0 + 100 * MS) == ann
    seq.begin(ann, T0 + 101 * MS)
    assert seq.phase is Phase.WAITING and not seq.start_overdue(T0 + 900 * MS)
    assert seq.chunk_accepted(T0 + 150 * MS) and not seq.chunk_accepted(T0 + 160 * MS)
    res, nxt = seq.finish(T0 + 3 * NS, {"success": True})
    assert res["episode"] == 1 and res["waited_s"] == pytest.approx(0.049) and nxt.episode == 2
    seq.begin(nxt, nxt.start_ns)
    assert seq.start_overdue(nxt.start_ns + 2 * NS)
    tl = EpisodeTimeline()
    assert tl.announce(3, T0) and not tl.announce(3, T0)  # latched repeats are not news
    tl.announce(2, T0 - NS)  # out of order
    assert [tl.episode_at(T0 - 2 * NS), tl.episode_at(T0 - 1), tl.episode_at(T0)] == [0, 2, 3]


def test_history_gap_breaks_history() -> None:
    h = ObservationHistory(2, 0.1)
    assert h.push(T0, np.zeros(3), pad=True) is not None
    assert h.push(T0 + 100 * MS, np.ones(3)) is not None
    assert h.push(T0 + 400 * MS, np.ones(3)) is None and h.gaps == 1


def test_image_observations_normalised_and_never_repeated() -> None:
    rgb = np.zeros((48, 64, 3), np.uint8)
    rgb[..., 0] = 255
    bgr = rgb[..., ::-1].copy()
    np.testing.assert_array_equal(decode("bgr8", 48, 64, 64 * 3, bgr.tobytes()), rgb)
    with pytest.raises(ValueError, match="encoding"):
        decode("yuv422", 48, 64, 128, b"\0" * 48 * 128)
    with pytest.raises(ValueError, match="bytes"):
        decode("rgb8", 48, 64, 192, b"\0" * 10)
    small = resize_bilinear(np.arange(16, dtype=np.uint8).reshape(4, 4, 1).repeat(3, 2), 2, 2)
    np.testing.assert_allclose(small[..., 0], [[2.5, 4.5], [10.5, 12.5]])
    b = ImageObservationBuilder(ImageNormalizer(24, 32, mean=(0.5,) * 3, std=(0.5,) * 3), 2, 10.0, 0.2)
    b.on_frame(T0, rgb)
    o = b.tick(T0 + 10 * MS)
    assert o is not None and o.history.shape == (2, 24, 32, 3) and o.history.dtype == np.float32
    np.testing.assert_allclose(o.history[0, 0, 0], [1.0, -1.0, -1.0])
    assert b.tick(T0 + 110 * MS) is None  # no new frame: not re-sent
    b.on_frame(T0 + 100 * MS, rgb)
    assert b.tick(T0 + 400 * MS) is None and b.status is InputStatus.STALE
    b.on_frame(T0 + 500 * MS, None, "bad frame")
    assert b.status is InputStatus.INVALID


def test_image_history_keeps_the_model_spacing_at_a_faster_policy_rate() -> None:
    """100 Hz ticks, a 20 Hz camera, a 0.1 s history: an observation per new frame, its frames 0.1 s apart."""
    b = ImageObservationBuilder(ImageNormalizer(4, 4), 2, 100.0, 0.2, history_spacing_s=0.1)
    sent = []
    for tick in range(1, 61):
        now = T0 + tick * 10 * MS
        if tick % 5 == 1:  # frame k, captured 10 ms before this tick, every pixel k
            k = tick // 5
            b.on_frame(now - 10 * MS, np.full((8, 8, 3), k, np.uint8))
        o = b.tick(now)
        if o is not None:
            sent.append((tick, o))
    assert [t % 5 for t, _ in sent] == [1] * len(sent) and len(sent) == 12  # one per frame, from the first on
    for t, o in sent[2:]:
        k = t // 5
        assert o.stamp_ns == T0 + (t - 1) * 10 * MS
        np.testing.assert_allclose(o.history[:, 0, 0, 0] * 255, [k - 2, k], atol=1e-4)  # 0.1 s = two frames
    assert b.history.gaps == 0
    b.announce_episode(1, T0 + 615 * MS)  # the last frame belongs to episode 0: the new history waits
    assert all(b.tick(T0 + (61 + i) * 10 * MS) is None for i in range(4))
    b.on_frame(T0 + 650 * MS, np.full((8, 8, 3), 200, np.uint8))
    o = b.tick(T0 + 660 * MS)
    assert o is not None and o.episode == 1 and o.padded
    np.testing.assert_allclose(o.history[:, 0, 0, 0] * 255, [200, 200], atol=1e-3)


# -- chunks ----------------------------------------------------------------------------------------------------
LOW, HIGH = -np.ones(7) * 2, np.ones(7) * 2


def _executor(watchdog: float = 0.3, max_age: float = 0.1) -> ChunkExecutor:
    return ChunkExecutor(CommandChecks(LOW, HIGH, watchdog_timeout=watchdog, max_start_deviation=0.35,
                                       max_chunk_age=max_age))


def _chunk(stamp: int, values: np.ndarray, dt: float = 0.1, episode: int | None = None) -> ActionChunk:
    return ActionChunk.from_offsets(stamp, np.arange(len(values)) * dt, values, episode)


def test_published_points_start_at_the_stamp() -> None:
    chunk = np.arange(16 * 7, dtype=float).reshape(16, 7)
    offsets, points = published_points(chunk, n_obs_steps=2, control_dt=0.1)
    assert offsets[0] == 0 and len(points) == 15
    np.testing.assert_array_equal(points[0], chunk[1])


def test_executor_interpolates_the_newest_chunk() -> None:
    ex = _executor()
    vals = np.stack([np.zeros(7), 0.1 * np.ones(7), 0.2 * np.ones(7)])
    assert ex.submit(_chunk(T0, vals), T0, np.zeros(7))[0]
    np.testing.assert_allclose(ex.command(T0 + 50 * MS, np.zeros(7)), 0.05)
    ex.interpolation = "zoh"
    np.testing.assert_allclose(ex.command(T0 + 150 * MS, np.zeros(7)), 0.1)
    ok, reason = ex.submit(_chunk(T0 - MS, vals), T0 + 60 * MS)
    assert not ok and "older" in reason
    assert ex.submit(_chunk(T0 + 60 * MS, vals + 0.05), T0 + 60 * MS, np.zeros(7))[0]
    np.testing.assert_allclose(ex.command(T0 + 60 * MS, np.zeros(7)), 0.05)


@pytest.mark.parametrize("case", ["nan", "shape", "timing", "stale", "limits", "far", "episode", "reset"])
def test_executor_refuses_what_the_arm_would_refuse(case: str) -> None:
    """Refused, never clamped or half-applied: the sim node and the Kortex bridge share these checks."""
    ex = _executor()
    ex.reset(T0, np.zeros(7), episode=4)
    vals = np.zeros((3, 7))
    now = T0 + 10 * MS
    cause = {"nan": "non-finite", "shape": "bad shape", "timing": "bad timing", "stale": "stale",
             "limits": "out of limits", "far": "too far", "episode": "outdated", "reset": "outdated"}[case]
    c = _chunk(now, vals)
    if case == "nan":
        vals[1, 2] = np.nan
    elif case == "shape":
        c = _chunk(now, np.zeros((3, 6)))
    elif case == "timing":
        c = ActionChunk(now, np.array([now, now, now + 1]), vals)
    elif case == "stale":
        now += 200 * MS
    elif case == "limits":
        vals[2, 1] = 10.0  # a later point beyond the limit: the whole chunk goes
    elif case == "far":
        c = _chunk(now, vals + 0.5)
    elif case == "episode":
        c = _chunk(now, vals, episode=3)
    else:
        c = _chunk(T0 - MS, vals)
    ok, reason = ex.submit(c, now, np.zeros(7))
    assert not ok and reason.startswith(cause) and ex.counters.reject_reasons == {cause: 1}
    assert ex.state is ExecState.IDLE and np.array_equal(ex.command(now, np.zeros(7)), np.zeros(7))
    assert ex.submit(_chunk(now, np.zeros((3, 7)), episode=4), now, np.zeros(7))[0]  # a good one is taken


def test_executor_holds_measured_pose_after_timeout_and_refuses_pre_reset_chunks() -> None:
    ex = _executor()
    ramp = np.linspace(0, 1.5, 31)[:, None] * np.ones(7)  # a 3 s plan
    ex.submit(_chunk(T0, ramp), T0)
    assert ex.command(T0 + 200 * MS, np.zeros(7))[0] == pytest.approx(0.1)
    measured = np.full(7, 0.12)
    held = ex.command(T0 + 301 * MS, measured)
    assert ex.state is ExecState.HOLD and ex.counters.timeouts == 1
    np.testing.assert_allclose(held, measured)
    np.testing.assert_allclose(ex.command(T0 + 2 * NS, np.zeros(7)), measured)  # the plan is not resumed
    ex.reset(T0 + 3 * NS, np.full(7, 0.3))
    assert not ex.submit(_chunk(T0 + 3 * NS - MS, ramp), T0 + 3 * NS)[0]
    np.testing.assert_allclose(ex.command(T0 + 3 * NS, np.zeros(7)), 0.3)
    ex.submit(_chunk(T0 + 3 * NS, ramp + 0.3), T0 + 3 * NS)
    ex.hold(T0 + 3 * NS + 50 * MS, np.full(7, 0.31))  # the hold command: at once, no watchdog wait
    assert ex.state is ExecState.HOLD and ex.counters.holds == 1
    np.testing.assert_allclose(ex.command(T0 + 3 * NS + 60 * MS, np.zeros(7)), 0.31)


# -- supervisor and statistics ---------------------------------------------------------------------------------
def test_supervisor_falls_back_at_once_and_recovers_with_hysteresis() -> None:
    s = FallbackSupervisor(fallback_enabled=True, recover_ticks=3)
    assert s.update(HEALTHY) is Mode.STUDENT
    assert s.update(Health(False, "NaN", "nonfinite")) is Mode.FALLBACK
    assert s.fallback_events == 1
    assert s.update(HEALTHY) is Mode.FALLBACK
    assert s.update(Health(False, "OOD", "ood")) is Mode.FALLBACK  # resets the streak, no new event
    assert [s.update(HEALTHY) for _ in range(3)][-1] is Mode.STUDENT
    assert s.fallback_events == 1 and s.unhealthy_by_kind == {"nonfinite": 1, "ood": 1}
    s.set_fallback_enabled(False)
    assert s.update(Health(False, "late", "deadline")) is Mode.HOLD
    assert s.select(is_teacher=True) is Mode.TEACHER
    assert s.update(Health(False, "x", "exception")) is Mode.TEACHER


def test_stats() -> None:
    st = SampleStats()
    assert st.summary()["p50"] is None
    for v in range(1, 101):
        st.add(v)
    s = st.summary()
    assert s["count"] == 100 and s["p50"] == pytest.approx(50.5) and s["max"] == 100
    assert st.summary(last=10)["p50"] == pytest.approx(95.5)
    r = RateMeter(500.0)
    for k in range(1001):
        r.tick(k * 0.002 + (0.001 if k == 500 else 0.0))
    s = r.summary()
    assert s["rate_hz"] == pytest.approx(500.0) and s["late_p99_ms"] >= 0 and s["interval_max_ms"] == pytest.approx(3)


# -- sim driver ------------------------------------------------------------------------------------------------
def _sim(time_limit: float = 8.0, **kw):
    from koopman_control.core.sim_driver import SimDriver
    from koopman_control.core.sim_tasks import Gen3Reach
    from koopman_sim import gen3

    checks = CommandChecks(gen3.JOINT_LOWER, gen3.JOINT_UPPER, watchdog_timeout=0.3)
    return SimDriver(Gen3Reach(time_limit=time_limit), checks, **kw)


def test_sim_driver_announces_resets_ahead_and_scores_from_the_first_chunk() -> None:
    d = _sim(time_limit=0.2, seed=3, auto_reset=True, start_timeout_s=1.0)
    ann = d.schedule_reset(T0)
    assert ann.episode == 1 and ann.start_ns == T0 + 100 * MS
    events = []
    t = T0
    for k in range(1, 800):  # 1.6 s of 2 ms steps
        t = T0 + k * 2 * MS
        st = d.step(t)
        if k == 100:  # 0.1 s after its reset, the first chunk: the episode's clock starts now
            assert d.sequencer.phase is Phase.WAITING
            assert d.submit(_chunk(t, np.stack([st.q] * 4), episode=1), t)[0]
        events += [(k, e) for e in (st.started, st.result, st.announced) if e is not None]
    kinds = [(type(e).__name__ if not isinstance(e, dict) else "result") for _, e in events]
    assert kinds[:4] == ["EpisodeStart", "result", "Announcement", "EpisodeStart"]
    res = events[1][1]
    assert res["episode"] == 1 and res["duration"] == pytest.approx(0.2, abs=0.01)
    assert res["waited_s"] == pytest.approx(0.1, abs=0.005)  # scored from the chunk, not from the reset
    # Episode 2 never gets a chunk: it ends unscored after start_timeout, with the reason.
    unscored = next(e for _, e in events[4:] if isinstance(e, dict))
    assert unscored["episode"] == 2 and not unscored["success"] and "no action chunk" in unscored["start"]
    assert d.summary()["episodes"] == 2 and d.summary()["episode_list"][0]["waited_s"] == res["waited_s"]


def test_sim_driver_refuses_out_of_limit_chunks_instead_of_clamping() -> None:
    from koopman_sim import gen3

    d = _sim(seed=1)
    d.schedule_reset(T0)
    t = T0 + 100 * MS
    st = d.step(t)
    target = np.array(st.q)
    target[1] = 5.0  # joint_2's limit is 2.24 rad
    ok, reason = d.submit(_chunk(t, np.stack([st.q, target])), t)
    assert not ok and reason.startswith("out of limits")
    d.step(t + 2 * MS)
    assert d.task.arm.target[1] < gen3.JOINT_UPPER[1] - 1.0


# -- stack description -----------------------------------------------------------------------------------------
def test_stack_description_follows_launch_arguments(tmp_path) -> None:
    from koopman_control.params import ParameterFileError, load_parameters
    from koopman_control.stack import StackArgs, StackError, build_stack, package_root

    root = package_root()
    specs = build_stack(StackArgs(), root=root)
    assert [s.name for s in specs] == ["sim", "state_ingest", "policy", "teacher"]
    assert all(s.executable == s.entry.split(":")[0].rsplit(".", 1)[1] for s in specs)
    pol = {s.name: s for s in specs}["policy"].parameters()
    assert pol["policy_rate"] == 10.0 and pol["teacher_fallback"] is True and pol["catalog_root"] == str(root)
    args = StackArgs.from_strings({"policy": "kdm", "policy_rate": "100", "use_camera": "true",
                                   "teacher_fallback": "false"})
    specs = {s.name: s for s in build_stack(args, root=root, overrides={"sim": {"seed": 7}})}
    assert set(specs) == {"sim", "state_ingest", "camera_ingest", "policy"}
    assert specs["policy"].parameters()["policy"] == "kdm"
    assert specs["state_ingest"].parameters()["policy_rate"] == 100.0
    assert specs["camera_ingest"].parameters()["policy_rate"] == 100.0
    assert specs["sim"].parameters()["publish_camera"] is True and specs["sim"].parameters()["seed"] == 7
    for node in specs.values():  # every node class resolves
        assert node.node_class().__name__ == node.entry.split(":")[1]
    bridge = {s.name: s for s in build_stack(StackArgs.from_strings({"use_sim": "false", "robot_ip": "10.0.0.2"}),
                                             root=root)}
    assert "sim" not in bridge and bridge["kortex_bridge"].parameters()["robot_ip"] == "10.0.0.2"
    with pytest.raises(StackError, match="use_sim"):
        StackArgs.from_strings({"use_sim": "maybe"})
    with pytest.raises(StackError, match="unknown launch arguments"):
        StackArgs.from_strings({"use_sym": "true"})
    with pytest.raises(StackError, match="not in the stack"):
        build_stack(StackArgs(), root=root, overrides={"camera_ingest": {"width": 1}})
    f = tmp_path / "p.yaml"
    f.write_text("/**:\n  ros__parameters:\n    a: 1\n    nested: {b: 2}\nsim:\n  ros__parameters:\n    a: 3\n")
    assert load_parameters(f, "sim") == {"a": 3, "nested.b": 2}
    assert load_parameters(f, "other") == {"a": 1, "nested.b": 2}
    f.write_text("sim: {a: 1}\n")
    with pytest.raises(ParameterFileError, match="ros__parameters"):
        load_parameters(f, "sim")


def test_periodic_loop_keeps_rate_and_reanchors_when_late() -> None:
    import time

    from koopman_control.core.realtime import PeriodicLoop

    calls: list[int] = []
    loop = PeriodicLoop(200.0, calls.append)
    loop.start()
    time.sleep(0.5)
    loop.stop()
    # No catch-up bursts above the nominal rate; the lower bound is liveness on a shared machine.
    assert 50 <= len(calls) <= 105 and 100 < loop.rate.summary()["rate_hz"] <= 210
    slow = PeriodicLoop(200.0, lambda skipped: time.sleep(0.05) if not calls.append(skipped) else None)
    calls.clear()
    slow.start()
    time.sleep(0.5)
    slow.stop()
    assert slow.overruns > 0 and slow.skipped > 0 and max(calls) > 0  # dropped cycles are reported to the body
    boom = PeriodicLoop(100.0, lambda _: 1 / 0)
    boom.start()
    time.sleep(0.1)
    assert isinstance(boom.error, ZeroDivisionError) and not boom.running


def test_a_streamed_input_is_paired_with_its_joint_sample_by_stamp() -> None:
    """Push-T's block pose comes on a topic of its own, stamped like the pusher's joint sample: the tick waits
    for the pose measured with it, and a pose that never comes stops the flow after the age limit."""
    pusht = resolve_contract("pusht")
    b = StateObservationBuilder(pusht.observation, 2, 10.0, max_state_age_s=0.05)
    agent = ["agent_x", "agent_y"]
    assert b.names == ("agent_x", "agent_y", "block_x", "block_y", "block_angle") and not b.needs_velocity
    assert b.on_joint_state(agent, [100.0, 200.0], [], T0, T0) is None  # the tick waits for its block pose
    assert b.set_vector("block", T0 - 10 * MS, [256.0, 256.0, 0.5], T0) is None  # an older pose does not do
    o = b.set_vector("block", T0, [250.0, 260.0, 0.7], T0 + MS)
    assert o is not None and np.allclose(o.history[-1], [100, 200, 250, 260, 0.7])
    assert b.on_joint_state(agent, [101.0, 200.0], [], T0 + 100 * MS, T0 + 100 * MS) is None
    for k in range(1, 40):  # the pusher keeps reporting, the block pose of the tick never comes
        b.on_joint_state(agent, [101.0, 200.0], [], T0 + (100 + 2 * k) * MS, T0 + (100 + 2 * k) * MS)
    assert b.check(T0 + 180 * MS) is InputStatus.STALE and "block" in b.reason


def test_wrapped_continuous_joints_are_unwrapped_onto_the_training_data() -> None:
    """A ros2_control joint_state_broadcaster wraps joint_3 to (-pi, pi]; the reach task's start pose has it at
    pi, so a reading of -3.13 is the training data's 3.15, and it stays continuous across the wrap."""
    from koopman_policy.contract import Contract

    d = REACH.to_dict()
    d["observation"][0]["reference"] = [0.0, 0.4, np.pi, -2.4, 0.0, -0.3, np.pi / 2]
    b = StateObservationBuilder(Contract.from_dict(d).observation, 1, 10.0)
    _task(b)
    q = np.array([0.0, 0.4, -3.13, -2.4, 0.0, -0.3, 1.5])
    o = b.on_joint_state(JOINTS, q, [0.0] * 7, T0, T0)
    assert o.history[-1, 2] == pytest.approx(-3.13 + 2 * np.pi) and o.history[-1, 1] == pytest.approx(0.4)
    q[2] = 3.12  # crossed the wrap back
    o = b.on_joint_state(JOINTS, q, [0.0] * 7, T0 + 100 * MS, T0 + 100 * MS)
    assert o.history[-1, 2] == pytest.approx(3.12)


def _drive_pusht(seed: int, ticks: int, act: Callable[[Any, int], np.ndarray | None]) -> tuple[Any, int]:
    """Push-T in the sim node's driver for ``ticks`` control periods: ``act(sample, k)`` at the k-th gives the
    one-point chunk sent then (None: nothing). Returns the driver and the time of the last tick."""
    from koopman_control.core.sim_driver import SimDriver
    from koopman_control.core.sim_tasks import PushT

    d = SimDriver(PushT(), seed=seed, sequential_seeds=True)
    d.schedule_reset(T0)
    t, k = T0, 0
    while k < ticks:
        t += 10 * MS
        st = d.sample(t)
        if d.sequencer.phase in (Phase.WAITING, Phase.RUNNING) and (t - d.sequencer.start_ns) % (100 * MS) == 0:
            target = act(st, k)
            k += 1
            if target is not None:
                assert d.submit(ActionChunk.from_offsets(t, [0.0], target[None], 1), t)[0]
        d.advance(t)
    return d, t


def test_the_pusht_sim_pushes_exactly_as_the_gym_environment() -> None:
    """Push-T in the sim node's driver, a one-point chunk per control period from the scripted pusher, goes
    through the same states as gym-pusht's ``env.step`` for the same seed: the stack's Push-T is the benchmark."""
    from koopman_sim.pusht_expert import PushTExpert
    from koopman_sim.tasks.pusht import PushTEnv, wrap_angle

    seed = 1003
    env, expert = PushTEnv(), PushTExpert()
    obs, _ = env.reset(seed=seed)
    expert.reset(obs, np.random.default_rng(0))
    gym_obs = [obs]
    for _ in range(40):
        obs, *_ = env.step(expert.act(obs))
        gym_obs.append(obs)
    expert = PushTExpert()
    sim_obs: list[np.ndarray] = []

    def act(st: Any, k: int) -> np.ndarray:
        b = st.streams["block"]
        o = np.array([*st.q, b[0], b[1], wrap_angle(b[2] % (2 * np.pi))], dtype=np.float32)
        if k == 0:
            expert.reset(o, np.random.default_rng(0))
        sim_obs.append(o)
        return expert.act(o)

    d, _ = _drive_pusht(seed, len(gym_obs), act)
    np.testing.assert_array_equal(np.array(sim_obs), np.array(gym_obs))
    assert d.sequencer.episode_seed_now == seed  # sequential seeds: episode 1 is the gym's seed


def test_the_pusht_sim_takes_targets_past_the_walls_as_the_gym_does() -> None:
    """Targets beyond the table (oneflow aims up to 118 px past it) are accepted and clamped to the table as
    the evaluation's environment clamps them (the same states); targets beyond the task file's action range
    are refused."""
    from koopman_sim.tasks.pusht import PushTEnv

    seed = 1000
    targets = [np.array(a) for a in ([-100.0, 300.0], [600.0, -60.0], [256.0, 630.0]) for _ in range(8)]
    env = PushTEnv()
    obs, _ = env.reset(seed=seed)
    gym_q = [obs[:2]]
    for a in targets:
        obs, *_ = env.step(a)
        gym_q.append(obs[:2])
    assert min(q.min() for q in gym_q) < 30 and max(q.max() for q in gym_q) > 470  # it went to the walls
    sim_q: list[np.ndarray] = []

    def act(st: Any, k: int) -> np.ndarray | None:
        sim_q.append(st.q.astype(np.float32))
        return targets[k] if k < len(targets) else None

    d, t = _drive_pusht(seed, len(gym_q), act)
    np.testing.assert_array_equal(np.array(sim_q), np.array(gym_q))
    ok, why = d.submit(ActionChunk.from_offsets(t, [0.0], np.array([[-200.0, 300.0]]), 1), t)
    assert not ok and "out of limits" in why
