"""Policy observations rebuilt from a recorded run exactly as the state-ingest node builds them live.

The recorded ``/joint_states``, the task's input topics (its contract's: the reach task's ``/task/target`` and
``/task/pillar``) and ``/task/episode`` messages are fed, in the order the ingest would have received them,
through the ingest's own core
(:class:`koopman_control.core.observation.StateObservationBuilder`), so the replay sees the same ticks, padding,
gaps and episode restarts as the live policy did.

Ordering: messages are fed in the order the recorder received them (the bag's log time), which is the order
a subscriber on the same machine sees them; which episode a sample or a task input belongs to follows from the
stamps (``/task/episode`` announces each episode's start, :mod:`koopman_control.core.episodes`), whatever that
order. Staleness is judged against each sample's own stamp ("received on time"): the age the live ingest saw is
a property of that run's transport, not of the recorded data. The live ingest's plausibility checks (joint
limits, speeds) are not repeated: a recorded run holds what the arm produced.

Limits: the live ingest anchors its tick grid on the first sample it saw, and again on the first sample of
every episode. The rebuild anchors on recorded ticks instead: an episode that started while recording starts
on its first sample (:func:`episode_anchors`); the one already running when recording started starts on a
recorded tick (:func:`default_anchor`) with its grid phase estimated from all its recorded ticks
(:func:`grid_phase`), since the grid point itself lies up to one feedback period before its tick sample.
Without recorded observations the grid is fixed to within one feedback period only, and a rebuilt tick can land
one sample (2 ms at 500 Hz) away from the live one. A stale-input fault or a sample the live ingest lost is
not visible in the recorded stamps either. Replays therefore use the recorded ``/policy/observation`` when it
exists and report how well the rebuild agrees.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from koopman_control.bag.reader import RecordedRun
from koopman_control.core.observation import NS, Observation, StateObservationBuilder

_TASK, _EPISODE, _STATE = 0, 1, 2


@dataclass
class Rebuilt:
    observations: list[Observation]
    sample_index: list[int]  # index into run.js_* of the newest step of each observation
    builder: StateObservationBuilder  # its counters: emitted, missed_ticks, faults, gaps, dropped


def _events(run: RecordedRun) -> list[tuple[int, int, int, object]]:
    """(time, kind, index, payload) in feeding order; see the module docstring.

    Latched state the recorder received late (it subscribed after the episode started) applies from the start:
    a first target/pillar stamped before the first joint state, and the episode id that came with them, are
    placed before every sample, as the ingest (running since the episode started) had them.
    """
    first_js = int(run.js_stamp_ns[0]) if len(run.js_stamp_ns) else 0
    early = -(2**62)
    ev: list[tuple[int, int, int, object]] = []
    latched_until: int | None = None
    for f, (which, msgs) in enumerate(run.vectors.items()):
        for k, (stamp, log, values) in enumerate(msgs):
            at = log
            if k == 0 and stamp < first_js:
                at = early
                latched_until = max(latched_until or log, log)
            ev.append((at, _TASK, f * 10**9 + k, (which, stamp, values)))
    for k, (log, episode, start) in enumerate(run.episodes):
        initial = k == 0 and latched_until is not None and log <= latched_until + NS // 2
        ev.append((early if initial else log, _EPISODE, k, (episode, start)))
    for i, log in enumerate(run.js_log_ns.tolist()):
        ev.append((log, _STATE, i, None))
    ev.sort(key=lambda e: (e[0], e[1], e[2]))
    return ev


def default_anchor(run: RecordedRun) -> int | None:
    """A recorded sample the live ingest ticked on: the oldest step of the first recorded observation whose
    sample is in the bag, else the first such chunk stamp (a chunk carries its observation's stamp), else None
    (the grid then starts at the first sample).

    The ingest anchors its tick grid on the first sample it ever saw, usually before the recorder started;
    starting the rebuild on a sample the ingest ticked on puts both on the same grid, so rebuilt observations
    carry the live stamps and recorded commands can be matched to them.
    """
    if not len(run.js_stamp_ns):
        return None
    recorded = set(run.js_stamp_ns.tolist())  # the anchor must be a sample the bag has (the recorder may miss some)
    for o in run.observations:
        if int(o.stamps_ns.min()) in recorded:
            return int(o.stamps_ns.min())
    for c in run.chunks:
        if c.stamp_ns in recorded:
            return int(c.stamp_ns)
    return None


def episode_anchors(run: RecordedRun) -> dict[int, int]:
    """Per episode, the sample the live ingest started it on: the oldest step of its first recorded observation
    (padded at an episode start, so that step is the episode's first sample), when the bag has that sample."""
    recorded = set(run.js_stamp_ns.tolist())
    out: dict[int, int] = {}
    for o in run.observations:
        first = int(o.stamps_ns.min())
        if o.episode not in out and first in recorded:
            out[o.episode] = first
    return out


def grid_phase(ticks: Sequence[int], period_ns: int, tol_ns: int) -> int | None:
    """A point of a live tick grid from tick stamps on it: the latest instant consistent with every tick.

    Each live tick is the first sample at or after its grid point less ``tol_ns``, so grid point k is at most
    ``tick_k + tol_ns``; the latest grid meeting all those bounds reproduces every recorded tick.
    """
    if not len(ticks):
        return None
    s0 = min(ticks)
    return min(s - round((s - s0) / period_ns) * period_ns for s in ticks) + tol_ns


def rebuild(run: RecordedRun, n_obs_steps: int, policy_rate_hz: float, use_task: bool = True,
            anchor_ns: int | str | None = "auto", clock: str = "stamp") -> Rebuilt:
    """Every observation the ingest would have published for this run, with its newest sample's index.

    Joint states stamped before ``anchor_ns`` are not fed (``"auto"``: :func:`default_anchor`). The observation
    emitted at the anchor itself is a warm-up (its history is padded, the live one was not) and is left out.
    With ``"auto"``, each later episode also starts on its recorded first sample (:func:`episode_anchors`).
    """
    auto = anchor_ns == "auto"
    anchor = default_anchor(run) if auto else anchor_ns
    starts = episode_anchors(run) if auto else {}
    episode_start: int | None = None
    # Was the live history at the anchor padded too (an episode start)? Then the first observation is real.
    live = next((o for o in run.observations if o.stamp_ns == anchor), None)
    if live is not None:
        warmup = bool(len(set(live.stamps_ns.tolist())) > 1)
    else:
        warmup = anchor is not None and len(run.js_stamp_ns) > 0 and anchor > int(run.js_stamp_ns[0])
    features = [f for f in run.contract.observation if f.kind != "image" and (use_task or f.kind != "vector")]
    b = StateObservationBuilder(features, n_obs_steps, policy_rate_hz)
    first = next((o for o in run.observations if anchor is not None and int(o.stamps_ns.min()) == anchor), None)
    phase = None
    if first is not None and auto:
        ticks = [o.stamp_ns for o in run.observations if o.episode == first.episode]
        phase = grid_phase(ticks, b.period_ns, b.tol_ns)
    names = list(run.joint_names)
    out: list[Observation] = []
    idx: list[int] = []
    for _log, kind, k, payload in _events(run):
        if kind == _TASK:
            which, stamp, xyz = payload  # type: ignore[misc]
            if use_task:
                b.set_vector(which, stamp, xyz)
        elif kind == _EPISODE:
            episode, start = payload  # type: ignore[misc]
            b.announce_episode(episode, start)
            episode_start = starts.get(int(episode))
        else:
            stamp = int(run.js_stamp_ns[k])
            if (anchor is not None and stamp < anchor) or (episode_start is not None and stamp < episode_start):
                continue
            now = int(run.js_log_ns[k]) if clock == "log" else stamp
            obs = b.on_joint_state(names, run.q[k], run.qd[k], stamp, now)
            if stamp == anchor and phase is not None:
                b.align_grid(phase)
            if obs is not None and not (stamp == anchor and obs.padded and not out and warmup):
                out.append(obs)
                idx.append(k)
    return Rebuilt(out, idx, b)
