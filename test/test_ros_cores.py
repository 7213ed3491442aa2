"""The control stack's plain-Python cores, without ROS: observations, chunk execution, fallback supervision,
statistics, the policy runner on real ONNX files, the sim driver, and the stack description."""

from __future__ import annotations

import numpy as np
import pytest

from koopman_control.core.chunk import ActionChunk, ChunkExecutor, ExecState, published_points
from koopman_control.core.image import ImageNormalizer, ImageObservationBuilder, decode, resize_bilinear
from koopman_control.core.observation import NS, InputStatus, ObservationHistory, StateObservationBuilder
from koopman_control.core.stats import RateMeter, SampleStats
from koopman_control.core.supervisor import HEALTHY, FallbackSupervisor, Health, Mode

JOINTS = [f"joint_{i}" for i in range(1, 8)]
MS = 1_000_000
T0 = 1_700_000_000 * NS


# -- observations ----------------------------------------------------------------------------------------------
def _builder(rate: float = 10.0, steps: int = 2) -> StateObservationBuilder:
    b = StateObservationBuilder(JOINTS, steps, rate, max_state_age_s=0.05)
    b.set_task(target=[0.6, 0.0, 0.17], pillar=[0.41, 0.0, 0.15])
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
    b = StateObservationBuilder(JOINTS, 2, 100.0, history_spacing_s=0.1)
    b.set_task(target=[0.6, 0.0, 0.17], pillar=[0.41, 0.0, 0.15])
    out = [o for k in range(250) if (o := _feed(b, T0 + k * 2 * MS, q=k * 1e-3)) is not None]
    assert len(out) == 50  # half a second at 100 Hz
    assert np.all(np.diff([o.stamp_ns for o in out]) == 10 * MS)
    first = out[0].stamp_ns
    assert out[0].padded and all(o.stamps_ns[0] == first for o in out[:10])  # the first 0.1 s: episode start
    assert all(o.stamps_ns[1] - o.stamps_ns[0] == 100 * MS for o in out[10:])
    assert np.allclose(out[20].history[0, :7], out[10].history[1, :7])
    with pytest.raises(ValueError, match="whole multiple"):
        StateObservationBuilder(JOINTS, 2, 15.0, history_spacing_s=0.1)


def test_a_late_sample_at_100hz_does_not_empty_the_history() -> None:
    """Feedback that pauses 9 ms puts two ticks 18 ms apart: the 0.1 s history must survive it, its steps
    still the samples nearest 0.1 s apart, and the ticks after it keep coming."""
    b = StateObservationBuilder(JOINTS, 2, 100.0, history_spacing_s=0.1)
    b.set_task(target=[0.6, 0.0, 0.17], pillar=[0.41, 0.0, 0.15])
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
    b = StateObservationBuilder(JOINTS, 2, 10.0, max_state_age_s=0.05)
    assert _feed(b, T0) is None and b.status is InputStatus.WAITING  # no target/pillar yet
    b.set_task(target=[0.6, 0, 0.17], pillar=[0.4, 0, 0.15])
    assert _feed(b, T0 + 2 * MS) is not None
    assert b.check(T0 + 30 * MS) is InputStatus.OK
    assert b.check(T0 + 80 * MS) is InputStatus.STALE
    b.set_task(target=[np.nan, 0, 0])
    assert b.status is InputStatus.INVALID and b.target is None


def test_episode_change_restarts_padded_history_and_tick_grid() -> None:
    b = _builder()
    _feed(b, T0)
    _feed(b, T0 + 100 * MS)
    b.set_episode(4)
    o = _feed(b, T0 + 130 * MS)  # right after the reset, off the old grid: emitted at once, padded
    assert o is not None and o.padded and o.episode == 4
    assert _feed(b, T0 + 200 * MS) is None  # the grid re-anchored at the reset
    assert _feed(b, T0 + 230 * MS) is not None


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
    b.set_episode(1)  # the last frame belongs to episode 0: the new history waits for the next frame
    assert all(b.tick(T0 + (61 + i) * 10 * MS) is None for i in range(4)) and len(b.history) == 0
    b.on_frame(T0 + 650 * MS, np.full((8, 8, 3), 200, np.uint8))
    o = b.tick(T0 + 660 * MS)
    assert o is not None and o.episode == 1 and o.padded
    np.testing.assert_allclose(o.history[:, 0, 0, 0] * 255, [200, 200], atol=1e-3)


# -- chunks ----------------------------------------------------------------------------------------------------
LOW, HIGH = -np.ones(7) * 2, np.ones(7) * 2


def _chunk(stamp: int, values: np.ndarray, dt: float = 0.1) -> ActionChunk:
    return ActionChunk.from_offsets(stamp, np.arange(len(values)) * dt, values)


def test_published_points_start_at_the_stamp() -> None:
    chunk = np.arange(16 * 7, dtype=float).reshape(16, 7)
    offsets, points = published_points(chunk, n_obs_steps=2, control_dt=0.1)
    assert offsets[0] == 0 and len(points) == 15
    np.testing.assert_array_equal(points[0], chunk[1])


def test_executor_interpolates_newest_chunk_and_clamps() -> None:
    ex = ChunkExecutor(LOW, HIGH, timeout_s=0.3)
    vals = np.stack([np.zeros(7), np.ones(7), 2 * np.ones(7)])
    assert ex.submit(_chunk(T0, vals), T0)[0]
    np.testing.assert_allclose(ex.command(T0 + 50 * MS, np.zeros(7)), 0.5)
    ex.interpolation = "zoh"
    np.testing.assert_allclose(ex.command(T0 + 150 * MS, np.zeros(7)), 1.0)
    ok, reason = ex.submit(_chunk(T0 - MS, vals), T0 + 160 * MS)
    assert not ok and "older" in reason
    ok, _ = ex.submit(_chunk(T0 + 160 * MS, np.full((2, 7), 5.0)), T0 + 160 * MS)
    assert ok and ex.counters.clamped == 1
    assert np.all(ex.command(T0 + 170 * MS, np.zeros(7)) <= HIGH)


@pytest.mark.parametrize("case", ["nan", "shape", "timing", "past"])
def test_executor_refuses_bad_chunks(case: str) -> None:
    ex = ChunkExecutor(LOW, HIGH, timeout_s=0.3)
    vals = np.zeros((3, 7))
    if case == "nan":
        vals[1, 2] = np.nan
        c = _chunk(T0, vals)
    elif case == "shape":
        c = _chunk(T0, np.zeros((3, 6)))
    elif case == "timing":
        c = ActionChunk(T0, np.array([T0, T0, T0 + 1]), vals)
    else:
        c = _chunk(T0 - 10 * NS, vals)
    ok, reason = ex.submit(c, T0)
    assert not ok and reason and ex.counters.rejected == 1
    assert ex.state is ExecState.IDLE and ex.command(T0, np.zeros(7)) is None


def test_executor_holds_measured_pose_after_timeout_and_refuses_pre_reset_chunks() -> None:
    ex = ChunkExecutor(LOW, HIGH, timeout_s=0.3)
    ramp = np.linspace(0, 1.5, 31)[:, None] * np.ones(7)  # a 3 s plan
    ex.submit(_chunk(T0, ramp), T0)
    assert ex.command(T0 + 200 * MS, np.zeros(7))[0] == pytest.approx(0.1)
    measured = np.full(7, 0.12)
    held = ex.command(T0 + 301 * MS, measured)
    assert ex.state is ExecState.HOLD and ex.counters.timeouts == 1
    np.testing.assert_allclose(held, measured)
    np.testing.assert_allclose(ex.command(T0 + 2 * NS, np.zeros(7)), measured)  # the plan is not resumed
    ex.reset(T0 + 3 * NS, np.full(7, 0.3))
    assert not ex.submit(_chunk(T0 + 2 * NS, ramp), T0 + 3 * NS)[0]
    np.testing.assert_allclose(ex.command(T0 + 3 * NS, np.zeros(7)), 0.3)


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
def test_sim_driver_scores_episodes_and_auto_resets() -> None:
    from koopman_control.core.sim_driver import SimDriver

    d = SimDriver(time_limit=0.2, seed=3, auto_reset=True)
    start = d.reset_episode(T0)
    assert start.episode == 1 and start.target.shape == (3,)
    results = []
    t = T0
    for _ in range(150):  # 0.3 s of 2 ms steps: the 0.2 s episode times out once
        t += 2 * MS
        st = d.step(t)
        if st.result is not None:
            results.append(st)
    assert len(results) == 1
    r = results[0]
    assert r.result["episode"] == 1 and not r.result["success"] and r.result["duration"] == pytest.approx(0.2, abs=0.01)
    assert r.started is not None and r.started.episode == 2 and d.episode == 2
    assert d.summary()["episodes"] == 1 and d.summary()["success_rate"] == 0.0


def test_sim_driver_clamps_chunks_to_joint_limits() -> None:
    from koopman_control.core.sim_driver import SimDriver
    from koopman_sim import gen3

    d = SimDriver(seed=1)
    d.reset_episode(T0)
    target = np.array(gen3.HOME_Q)
    target[1] = 5.0  # joint_2's limit is 2.24 rad
    ok, _ = d.submit(_chunk(T0, np.stack([target, target])), T0)
    assert ok and d.executor.counters.clamped == 1
    d.step(T0 + 2 * MS)
    assert d.arm.target[1] == pytest.approx(gen3.JOINT_UPPER[1])


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
