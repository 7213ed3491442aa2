"""The policy node in the running stack (real rclpy, DDS, MuJoCo and ONNX Runtime):

* swapping ``policy`` to the teacher and back through the SetParameters service misses no control tick;
  missing, corrupt or unknown models are refused with a reason and the running policy keeps going;
* ``policy`` reads back the policy that runs (the catalogue default by name);
* a student that genuinely produces NaN, or raises, for part of the task space hands over to the teacher
  within one policy period, the arm holding until the teacher's chunk for that tick arrives, and control
  returns to it after the hysteresis;
* in fallback, a teacher chunk of another episode or older than a model period is never adopted: the arm holds;
* a closed-loop episode with the shipped default student reaches the target.

The swap and fallback tests use small untrained policies exported through the real export path
(:func:`koopman_control.testing.export_untrained`), listed in a catalogue of their own, so they exercise the
mechanism whether or not trained models are present; the closed-loop test needs the trained student.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import Participant, wait_until
from rcl_interfaces.srv import GetParameters, SetParameters
from rclpy.parameter import Parameter
from std_msgs.msg import String
from std_srvs.srv import Trigger
from trajectory_msgs.msg import JointTrajectory

from koopman_control import topics
from koopman_control.bringup import Stack
from koopman_control.core.episodes import episode_label, parse_episode
from koopman_control.core.policy_runner import PolicyLoadError, PolicyRunner
from koopman_control.ros import convert, qos
from koopman_control.stack import StackArgs, build_stack
from koopman_control.testing import export_untrained, inject_fault

TARGET_Y = 15  # index of target_y in the task observation
PERIOD = 0.1


@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A catalogue root with untrained student and teacher and two faulty students (target_y > 0 -> fault)."""
    root = tmp_path_factory.mktemp("catalog")
    m = root / "models"
    export_untrained("dkoopman", m / "student.onnx")
    export_untrained("teacher", m / "teacher.onnx", teacher_steps=2)
    inject_fault(m / "student.onnx", m / "nan_student.onnx", TARGET_Y, 0.0, "nan")
    inject_fault(m / "student.onnx", m / "raising_student.onnx", TARGET_Y, 0.0, "shape")
    (m / "corrupt.onnx").write_bytes(np.random.default_rng(0).bytes(4096))
    (root / "config").mkdir()
    entries = {"student": ("dkoopman", "student.onnx"), "teacher": ("teacher", "teacher.onnx"),
               "nan_student": ("dkoopman", "nan_student.onnx"), "raising_student": ("dkoopman", "raising_student.onnx"),
               "ghost": ("dkoopman", "ghost.onnx")}
    lines = ["policies:"] + [f"  {k}: {{method: {meth}, onnx: models/{f}}}" for k, (meth, f) in entries.items()]
    (root / "config" / "policies.yaml").write_text("\n".join([*lines, "default: student", ""]))
    return root


def test_runner_health_on_real_onnx_files(catalog: Path) -> None:
    r = PolicyRunner.load("student", root=catalog, providers=["CPUExecutionProvider"])
    m = r.meta
    mid = ((m.obs_low + m.obs_high) / 2).astype(np.float32)
    hist = np.repeat(mid[None], 2, 0)
    hist[:, TARGET_Y] = -0.02
    res = r.step(hist, m.obs_names)
    assert res.health.ok and res.chunk.shape == (16, 7) and np.isfinite(res.chunk).all()
    r.new_episode(1)
    noise1 = r.noise.copy()
    r.new_episode(2)
    assert not np.array_equal(noise1, r.noise)  # new episode, new noise; same episode keeps it
    assert not r.step(hist[:1], m.obs_names).health.ok  # too short a history
    shuffled = list(reversed(m.obs_names))
    np.testing.assert_allclose(r.step(hist[:, ::-1], shuffled).chunk, r.step(hist, m.obs_names).chunk)
    bad = hist.copy()
    bad[:, TARGET_Y] = 0.02
    for name, kind in (("nan_student", "nonfinite"), ("raising_student", "exception")):
        f = PolicyRunner.load(name, root=catalog, providers=["CPUExecutionProvider"])
        assert f.step(hist, m.obs_names).health.ok
        h = f.step(bad, m.obs_names).health
        assert not h.ok and h.kind == kind, h
    r.ood_threshold = 1e-9
    res = r.step(hist, m.obs_names)
    if res.ood_score is not None and res.ood_score > 1e-9:
        assert res.health.kind == "ood"
    with pytest.raises(PolicyLoadError, match="does not exist"):
        PolicyRunner.load("ghost", root=catalog)
    with pytest.raises(PolicyLoadError, match="unknown policy"):
        PolicyRunner.load("no_such_policy", root=catalog)
    with pytest.raises(PolicyLoadError, match="not a readable ONNX"):
        PolicyRunner.load(str(catalog / "models" / "corrupt.onnx"), root=catalog)


class Probe:
    """The test's own participant: watches observations, chunks and mode; calls services like ``ros2``."""

    def __init__(self, p: Participant) -> None:
        self.p = p
        self.chunks: list[tuple[int, JointTrajectory]] = p.record(topics.ACTION_CHUNK, JointTrajectory, qos.CONTROL)
        self.mode_msgs = p.record(topics.MODE, String, qos.LATCHED)
        self.obs: list[tuple[int, int, float]] = []  # (stamp, episode, target_y)
        p.node.create_subscription(JointTrajectory, topics.OBSERVATION, self._on_obs, qos.CONTROL)

    @property
    def modes(self) -> list[str]:
        return [m.data for _, m in self.mode_msgs]

    def _on_obs(self, m: JointTrajectory) -> None:
        if m.points:
            stamp, hist, names, _ = convert.observation_from_msg(m)
            self.obs.append((stamp, parse_episode(m.header.frame_id), float(hist[-1, names.index("target_y")])))

    def set_policy(self, value: str):
        req = SetParameters.Request(parameters=[Parameter("policy", value=value).to_parameter_msg()])
        return self.p.call(SetParameters, "/policy/set_parameters", req).results[0]

    def get_policy(self) -> str:
        return self.p.call(GetParameters, "/policy/get_parameters",
                           GetParameters.Request(names=["policy"])).values[0].string_value

    def reset_until(self, side_positive: bool) -> tuple[int, int]:
        """Reset episodes until target_y has the wanted sign; returns (episode, stamp of its first obs)."""
        for _ in range(40):
            ep = json.loads(self.p.call(Trigger, "/sim/reset_episode", Trigger.Request()).message)["episode"]
            first = wait_until(lambda ep=ep: next((o for o in self.obs if o[1] == ep), None), 5.0,
                               what=f"the first observation of episode {ep}")
            if (first[2] > 0) == side_positive:
                return ep, first[0]
        raise AssertionError("the task never sampled a target on the wanted side")

    def chunk_for(self, stamp: int, timeout: float = 5.0, hold: bool = False) -> tuple[int, JointTrajectory]:
        """The first chunk (or hold command) published for the tick ``stamp``."""
        return wait_until(lambda: next((c for c in self.chunks if convert.from_time(c[1].header.stamp) == stamp
                                        and bool(c[1].points) != hold), None), timeout,
                          what=f"the {'hold' if hold else 'chunk'} for an observation")


@pytest.fixture
def running(catalog: Path, contexts, participant) -> Iterator[tuple[Stack, Probe]]:
    overrides = {
        "sim": {"auto_reset": False, "time_limit": 120.0, "seed": 11},
        "policy": {"catalog_root": str(catalog), "recover_ticks": 3},
        "teacher": {"catalog_root": str(catalog), "policy": "teacher"},
    }
    with Stack.from_args(StackArgs(), overrides=overrides, context=contexts()) as stack:
        probe = Probe(participant("policy_probe"))
        wait_until(lambda: len(probe.chunks) >= 5, 20.0, what="action chunks from the running stack")
        yield stack, probe
        stack.check()


def _stamps_after(probe: Probe, t_ns: int) -> np.ndarray:
    return np.array([convert.from_time(m.header.stamp) for rx, m in probe.chunks if rx >= t_ns])


def test_swap_to_teacher_and_back_misses_no_tick_and_bad_models_are_refused(running, catalog: Path) -> None:
    stack, probe = running
    pol = stack["policy"]
    assert probe.get_policy() == "student"  # left empty in the parameter file: reads back the default's name
    t_start = time.time_ns()
    missed0, swaps0 = pol.stats.missed_ticks, pol.stats.swaps
    res = probe.set_policy("teacher")
    assert res.successful, res.reason
    wait_until(lambda: probe.modes and probe.modes[-1] == "teacher", 5.0, what="mode 'teacher'")
    n = len(probe.chunks)
    wait_until(lambda: len(probe.chunks) >= n + 5, 5.0, what="teacher chunks")
    res = probe.set_policy("student")
    assert res.successful, res.reason
    wait_until(lambda: probe.modes[-1] == "student", 5.0, what="mode 'student'")
    n = len(probe.chunks)
    wait_until(lambda: len(probe.chunks) >= n + 5, 5.0, what="student chunks again")
    assert pol.stats.swaps == swaps0 + 2
    assert pol.stats.missed_ticks == missed0, pol.metrics()
    stamps = _stamps_after(probe, t_start)
    assert len(stamps) >= 10 and np.diff(stamps).max() < 1.5 * PERIOD * 1e9  # a chunk every tick, no gap
    assert len(set(stamps.tolist())) == len(stamps)  # one chunk per tick

    for bad, reason in ((str(catalog / "models" / "missing.onnx"), "unknown policy"),
                        (str(catalog / "models" / "corrupt.onnx"), "not a readable ONNX"),
                        ("ghost", "does not exist"), ("no_such_policy", "known: ")):
        n = len(probe.chunks)
        res = probe.set_policy(bad)
        assert not res.successful and reason in res.reason, res.reason
        assert probe.get_policy() == "student"
        wait_until(lambda n=n: len(probe.chunks) >= n + 2, 3.0, what="chunks after a refused model")
    assert pol.runner.name == "student" and pol.stats.swaps == swaps0 + 2 and probe.modes[-1] == "student"
    assert pol.stats.missed_ticks == missed0


@pytest.mark.parametrize(("faulty", "kind"), [("nan_student", "nonfinite"), ("raising_student", "exception")])
def test_student_failure_hands_over_to_teacher_within_one_period(running, faulty: str, kind: str) -> None:
    stack, probe = running
    pol = stack["policy"]
    probe.reset_until(side_positive=False)
    res = probe.set_policy(faulty)  # probed on the current observation (target_y < 0): passes
    assert res.successful, res.reason
    wait_until(lambda: pol.runner.name == faulty and len(pol.stats.latency) > 0, 5.0,
               what="the faulty student to run")
    n_fallbacks = pol.supervisor.fallback_events
    ep, stamp = probe.reset_until(side_positive=True)  # its first tick is the first fault
    rx_hold, _ = probe.chunk_for(stamp, hold=True)  # the arm holds at once ...
    rx, chunk = probe.chunk_for(stamp)  # ... until the teacher's chunk for that very tick arrives
    assert rx_hold <= rx and (rx - stamp) / 1e9 < PERIOD, \
        f"teacher chunk {(rx - stamp) / 1e6:.1f} ms after the failing observation"
    assert np.isfinite([p.positions for p in chunk.points]).all() and len(chunk.points) > 0
    assert parse_episode(chunk.header.frame_id) == ep
    wait_until(lambda: "teacher_fallback" in probe.modes, 2.0, what="mode 'teacher_fallback'")
    assert pol.supervisor.fallback_events == n_fallbacks + 1
    assert pol.supervisor.unhealthy_by_kind.get(kind, 0) >= 1
    assert pol.stats.teacher_plans >= 1
    n = len(probe.chunks)  # the teacher keeps serving every tick while the student fails
    wait_until(lambda: len(probe.chunks) >= n + 3, 2.0, what="teacher chunks in fallback")
    probe.reset_until(side_positive=False)  # healthy again: back to the student after 3 healthy ticks
    wait_until(lambda: probe.modes[-1] == "student", 3.0, what="the return to the student")
    # No NaN chunk ever reached the arm (chunks computed before a reset may be refused as outdated).
    assert "non-finite" not in stack["sim"].driver.executor.counters.reject_reasons


def test_fallback_adopts_only_the_teachers_answer_to_this_episode_and_holds_meanwhile(
        catalog: Path, contexts, participant) -> None:
    """Without a teacher node, the test plays the teacher: chunks of another episode, or computed from an
    observation older than one model period, are never adopted (the arm holds); the right one is."""
    overrides = {"sim": {"auto_reset": False, "time_limit": 120.0, "seed": 11},
                 "policy": {"catalog_root": str(catalog), "policy": "student", "recover_ticks": 3}}
    specs = [s for s in build_stack(StackArgs(), overrides=overrides) if s.name != "teacher"]
    with Stack(specs, context=contexts()) as stack:
        pol = stack["policy"]
        probe = Probe(participant("teacher_impostor"))
        wait_until(lambda: len(probe.chunks) >= 3, 20.0, what="chunks from the running stack")
        assert not pol.teacher_running() and "teacher not running" in pol.diagnostics()[0][2]
        teacher = probe.p.publisher(topics.TEACHER_CHUNK, JointTrajectory, qos.TEACHER)
        probe.reset_until(side_positive=False)
        assert probe.set_policy("nan_student").successful
        wait_until(lambda: pol.runner.name == "nan_student", 5.0, what="the faulty student to run")
        ep, _ = probe.reset_until(side_positive=True)
        wait_until(lambda: pol.supervisor.mode.value == "teacher_fallback", 3.0, what="the fallback")
        n_holds = pol.stats.holds
        wait_until(lambda: pol.stats.holds >= n_holds + 3, 3.0, what="hold commands while no teacher answers")
        q = np.asarray(stack["sim"].driver.task.arm.q)

        def answer(episode: int, age_ns: int) -> int:
            stamp = probe.obs[-1][0] - age_ns
            plans = pol.stats.teacher_plans
            teacher.publish(convert.chunk_msg(stamp, [f"joint_{i}" for i in range(1, 8)], np.arange(8) * 0.1,
                                              np.repeat(q[None], 8, 0), episode_label(episode)))
            return plans

        plans = answer(ep - 1, 0)  # another episode's answer
        wait_until(lambda: pol.stats.holds >= n_holds + 6, 3.0, what="more holds")
        plans = answer(ep, 150_000_000)  # computed 150 ms before the tick: older than a model period
        wait_until(lambda: pol.stats.holds >= n_holds + 9, 3.0, what="more holds")
        assert pol.stats.teacher_plans == plans, "a stale or foreign teacher chunk was adopted"
        wait_until(lambda: answer(ep, 0) > plans, 3.0, interval=0.02,
                   what="the teacher's answer to this episode's tick to be adopted")
        assert "non-finite" not in stack["sim"].driver.executor.counters.reject_reasons


def test_closed_loop_episodes_with_shipped_student_reach_target(contexts) -> None:
    from koopman_policy.catalog import resolve_policy

    entry = resolve_policy(None)
    assert entry.onnx is not None and entry.onnx.is_file(), f"the shipped default student {entry.onnx} is missing"
    with Stack.from_args(StackArgs(), overrides={"sim": {"seed": 0}}, context=contexts()) as stack:
        node = stack["sim"]
        wait_until(lambda: len(node.driver.results) >= 3, 45.0, interval=0.1, what="three episodes")
        results = node.driver.results[:3]
        stack.check()
    # The node redraws its noise per decision, keyed on the tick stamps, so an episode through DDS is one
    # draw of a policy that succeeds in 0.97 of them (139 of 143 in results/bench_stack_10hz.json): two of three.
    reached = [r for r in results if r["success"] and not r["collision"]]
    assert len(reached) >= 2, results
    assert all(r["min_distance"] < 0.02 for r in reached), reached
