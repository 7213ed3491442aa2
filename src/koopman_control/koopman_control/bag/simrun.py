"""Record a simulated run straight into a bag, without ROS and faster than real time.

The same cores the live stack runs (``SimDriver`` physics and executor, the ingest's observation builder,
``PolicyRunner`` with its health checks, the fallback supervisor) are stepped in lock-step on a virtual clock and
every message the nodes would publish is written with its stamp. Such a bag has the topics, types and timing
conventions of a recording of the live stack, with zero transport and compute latency: a reproducible reference
for the replay (replaying the policy that drove it reproduces the recorded chunks) and a quick way to produce
training data from the scripted expert (``driver="expert"``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from koopman_control.bag import messages as M
from koopman_control.bag import topics as T
from koopman_control.bag.writer import BagSink
from koopman_control.contracts import resolve_contract
from koopman_control.core.chunk import ActionChunk, CommandChecks, published_points
from koopman_control.core.episodes import Announcement, episode_label
from koopman_control.core.observation import NS, StateObservationBuilder
from koopman_control.core.sim_driver import EpisodeStart
from koopman_control.core.sim_tasks import Gen3Reach
from koopman_control.core.supervisor import FallbackSupervisor, Mode

EPOCH_NS = 1_700_000_000 * NS  # virtual clock start: a plausible wall-clock time, stable across runs


@dataclass
class SimRunSummary:
    path: str
    messages: int
    duration_s: float
    episodes: int
    ticks: int
    chunks: int


def record_sim_run(out: str | Path, *, driver: str = "expert", policy: str | None = None, duration_s: float = 10.0,
                   seed: int = 0, feedback_rate_hz: float = 100.0, policy_rate_hz: float = 10.0, n_obs_steps: int = 2,
                   storage: str = "mcap", time_limit: float = 8.0, log_latency_ns: int = 300_000) -> SimRunSummary:
    """Simulate ``duration_s`` of the stack driven by the scripted expert or a policy and write it to ``out``.

    Joint states are logged ``log_latency_ns`` after their stamp (a nominal transport delay, so log time and
    header stamp differ as in a real recording).
    """
    from koopman_control.core.sim_driver import SimDriver
    from koopman_sim.expert import ScriptedExpert

    if driver not in ("expert", "policy"):
        raise ValueError(f"driver must be 'expert' or 'policy', got {driver!r}")
    runner = None
    if driver == "policy":
        from koopman_control.core.policy_runner import PolicyRunner

        runner = PolicyRunner.load(policy, seed=seed)
        n_obs_steps = max(n_obs_steps, runner.meta.n_obs_steps)
        policy_rate_hz = 1.0 / runner.meta.control_dt
    import gen3_description as gen3

    checks = CommandChecks(gen3.JOINT_LOWER, gen3.JOINT_UPPER, interpolation="zoh")
    sim = SimDriver(Gen3Reach(physics_dt=1.0 / feedback_rate_hz, time_limit=time_limit), checks,
                    feedback_rate_hz=feedback_rate_hz, seed=seed, auto_reset=True)
    names = list(sim.joint_names)
    obs_names = [f"q_{n}" for n in names] + [f"qd_{n}" for n in names] + [
        "target_x", "target_y", "target_z", "pillar_x", "pillar_y", "pillar_z"]
    builder = StateObservationBuilder(resolve_contract("").observation, n_obs_steps, policy_rate_hz)
    supervisor = FallbackSupervisor(fallback_enabled=False)
    if runner is not None:
        supervisor.select(runner.is_teacher)
    expert = ScriptedExpert()
    period_ns = round(NS / feedback_rate_hz)
    control_dt = 1.0 / policy_rate_hz
    custom = {"koopman.recorder": "simrun", "koopman.driver": driver if runner is None else f"policy:{runner.name}",
              "koopman.policy_rate": f"{policy_rate_hz:g}", "koopman.n_obs_steps": str(n_obs_steps),
              "koopman.feedback_rate": f"{feedback_rate_hz:g}", "koopman.seed": str(seed)}
    now = EPOCH_NS
    ticks = chunks = 0
    with BagSink(out, storage=storage, custom_data=custom) as bag:
        for name in T.DEFAULT_RECORD:
            if name != T.DIAGNOSTICS and (name != T.TEACHER_CHUNK):
                bag.add_topic(name, T.STACK_TOPICS[name].msgtype)

        def announce(ann: Announcement, t: int) -> None:
            bag.write(T.EPISODE, t + log_latency_ns, M.episode(ann.episode, ann.start_ns))
            builder.announce_episode(ann.episode, ann.start_ns)

        def task(e: EpisodeStart) -> None:
            t = e.stamp_ns + log_latency_ns - 10_000  # before that step's joint state, as the sim publishes them
            bag.write(T.TARGET, t, M.point_stamped(e.stamp_ns, e.inputs["target"]))
            bag.write(T.PILLAR, t + 1000, M.point_stamped(e.stamp_ns, e.inputs["pillar"]))
            for name, values in e.inputs.items():
                builder.set_vector(name, e.stamp_ns, values)

        def publish_mode(mode: Mode, t: int) -> None:
            bag.write(T.MODE, t, M.string(mode.value))

        announce(sim.schedule_reset(now), now)
        mode = supervisor.mode if runner is not None else Mode.TEACHER
        publish_mode(mode, now + 4000)
        expert_episode = -1
        for _ in range(round(duration_s * feedback_rate_hz)):
            now += period_ns
            st = sim.step(now)
            if st.started is not None:
                task(st.started)
            bag.write(T.JOINT_STATES, now + log_latency_ns, M.joint_state(now, names, st.q, st.qd))
            obs = builder.on_joint_state(names, st.q, st.qd, now, now)
            if obs is not None:
                ticks += 1
                t_obs = now + log_latency_ns + 100_000
                offs = (obs.stamps_ns - obs.stamp_ns).tolist()
                label = episode_label(obs.episode)
                bag.write(T.OBSERVATION, t_obs, M.trajectory(obs.stamp_ns, obs_names, offs, obs.history, label))
                points = None
                if runner is None:
                    vec = obs.history[-1]
                    if expert_episode != obs.episode:
                        expert.reset(vec, np.random.default_rng([seed, obs.episode]))
                        expert_episode = obs.episode
                    offsets, points = np.zeros(1), expert.act(vec).astype(np.float64)[None]
                else:
                    runner.new_episode(obs.episode)
                    res = runner.step(obs.history, obs_names, stamp_ns=obs.stamp_ns)
                    new_mode = supervisor.update(res.health, obs.stamp_ns)
                    if new_mode is not mode:
                        mode = new_mode
                        publish_mode(mode, t_obs + 1)
                    if res.chunk is not None and mode in (Mode.STUDENT, Mode.TEACHER):
                        m = runner.meta
                        offsets, points = published_points(res.chunk, m.n_obs_steps, m.control_dt)
                if points is not None:
                    off_ns = np.round(np.asarray(offsets) * NS).astype(np.int64)
                    bag.write(T.ACTION_CHUNK, t_obs + 200_000,
                              M.trajectory(obs.stamp_ns, names, off_ns.tolist(), points, label))
                    sim.submit(ActionChunk(obs.stamp_ns, obs.stamp_ns + off_ns, points, obs.episode), now)
                    chunks += 1
            if st.result is not None:
                bag.write(T.EPISODE_RESULT, now + log_latency_ns + 1, M.string(json.dumps(st.result)))
            if st.announced is not None:
                announce(st.announced, now)
        count = bag.message_count
    del control_dt
    return SimRunSummary(str(out), count, duration_s, len(sim.results), ticks, chunks)
