"""Recorded runs -> a demonstration dataset in ``koopman_sim.dataset``'s HDF5 format (training on your own data).

What the dataset holds is a task's contract (:mod:`koopman_policy.contract`; a task file, default the reach
task): its observation at every policy tick, rebuilt from ``/joint_states`` and the input topics the contract
names exactly as the live ingest builds them (:mod:`koopman_control.bag.observations`, one-step history), so
``obs[k]`` is what a policy of that task would see at tick ``k``; its action, the contract's joints; and the
contract itself, which the teacher, the students and their exports carry on.

Actions (``action_source``):

* ``chunk``: the joint target the arm was commanded at tick ``k``, from the recorded ``/policy/action_chunk``:
  the newest chunk stamped at or before the tick, sampled at the tick (a chunk stamped at the tick gives its
  first point, time_from_start 0, i.e. exactly the action the policy chose for that observation; a tick the
  policy did not answer gets the previous chunk's point for that instant, as the executor applied it). A tick
  with no chunk within ``command_timeout_s`` (the arm was holding) is not a demonstration and ends the segment.
* ``next_q``: the measured joint position at the next tick, for bags without commands (teleoperation, other
  controllers); with a position-controlled arm that is where the command took it. The last tick of each
  segment has no successor and is dropped.
* ``auto`` (default): ``chunk`` when the bag has ``/policy/action_chunk``, else ``next_q``.

Episodes follow ``/task/episode``; a gap in the ticks (missed samples, stale input) or a hold also starts a new
episode, because consecutive rows must be one control period apart. Success, side and seed come from
``/task/episode_result`` (the same fields the simulator reports) and are copied to every segment of that episode;
without a result an episode is marked unsuccessful with side -1 and seed -1.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from koopman_control.bag import topics as T
from koopman_control.bag.observations import rebuild
from koopman_control.bag.reader import BagTopicError, RecordedRun, load_run
from koopman_control.core.observation import NS
from koopman_policy.contract import Contract

ACTION_SOURCES = ("auto", "chunk", "next_q")


@dataclass
class Segment:
    obs: np.ndarray  # (n, obs_dim) float32
    action: np.ndarray  # (n, action_dim) float32
    episode: int
    result: dict[str, Any] | None
    bag: str


def _command_at(chunks: list[Any], stamps: np.ndarray, t: int, timeout_ns: int) -> np.ndarray | None:
    """The executor's target at ``t``: newest chunk stamped <= t, held at its ends; None when timed out."""
    i = int(np.searchsorted(stamps, t, side="right")) - 1
    if i < 0 or t - chunks[i].stamp_ns > timeout_ns:
        return None
    c = chunks[i]
    tt, p = c.times_ns, c.positions
    if t <= tt[0]:
        return p[0]
    if t >= tt[-1]:
        return p[-1]
    j = int(np.searchsorted(tt, t, side="right")) - 1
    a = (t - tt[j]) / (tt[j + 1] - tt[j])
    return p[j] + a * (p[j + 1] - p[j])


def segments_from_run(run: RecordedRun, policy_rate_hz: float = 10.0, action_source: str = "auto",
                      command_timeout_s: float = 0.3) -> tuple[list[Segment], str]:
    """Split a run into gap-free, single-episode segments of (obs, action) rows; returns the source used."""
    if action_source not in ACTION_SOURCES:
        raise ValueError(f"action source must be one of {', '.join(ACTION_SOURCES)}, got {action_source!r}")
    if action_source == "auto":
        action_source = "chunk" if run.chunks else "next_q"
    if action_source == "chunk" and not run.chunks:
        raise BagTopicError(f"{run.path}: action source 'chunk' needs {T.ACTION_CHUNK}, which the bag does not "
                            "have; use --action-source next_q")
    rb = rebuild(run, 1, policy_rate_hz)
    period = round(NS / policy_rate_hz)
    c = run.contract
    q_names = {j: n for f in c.observation if f.kind == "joint_position" for j, n in zip(f.joints, f.names,
                                                                                             strict=True)}
    missing = [j for j in c.action_joints if j not in q_names]
    if action_source == "next_q" and missing:
        raise ValueError(f"action source next_q needs the positions of {missing} in the observation")
    next_q = [list(rb.builder.names).index(q_names[j]) for j in c.action_joints] if not missing else []
    results = {int(r["episode"]): r for r in run.results if "episode" in r}
    chunk_stamps = np.array([c.stamp_ns for c in run.chunks], dtype=np.int64)
    timeout = round(command_timeout_s * NS)
    segs: list[Segment] = []
    rows_o: list[np.ndarray] = []
    rows_a: list[np.ndarray] = []
    cur_ep: int | None = None
    last_t: int | None = None

    def close() -> None:
        if rows_o:
            segs.append(Segment(np.stack(rows_o).astype(np.float32), np.stack(rows_a).astype(np.float32), cur_ep or 0,
                                results.get(cur_ep or 0), run.path))
        rows_o.clear()
        rows_a.clear()

    obs = rb.observations
    for k, o in enumerate(obs):
        vec = o.history[-1]
        if o.episode != cur_ep or (last_t is not None and o.stamp_ns - last_t > 1.5 * period):
            close()
            cur_ep = o.episode
        last_t = o.stamp_ns
        if action_source == "chunk":
            act = _command_at(run.chunks, chunk_stamps, o.stamp_ns, timeout)
        else:
            nxt = obs[k + 1] if k + 1 < len(obs) else None
            ok = nxt is not None and nxt.episode == o.episode and nxt.stamp_ns - o.stamp_ns <= 1.5 * period
            act = nxt.history[-1][next_q] if ok else None  # type: ignore[union-attr]
        if act is None:
            close()
            continue
        rows_o.append(vec)
        rows_a.append(np.asarray(act, dtype=np.float64))
    close()
    return segs, action_source


def bags_to_dataset(bags: Sequence[str | Path], out: str | Path, *, contract: Contract | None = None,
                    action_source: str = "auto", min_steps: int = 2, successful_only: bool = False,
                    allow_unsorted: bool = False) -> dict[str, Any]:
    """Convert bags of one task (``contract``, default the reach task) into one dataset file; returns a
    summary (rows, episodes, sources, sha256)."""
    from koopman_control.contracts import resolve_contract
    from koopman_sim.dataset import side_code, write_dataset

    contract = contract or resolve_contract("")
    if not bags:
        raise ValueError("no bags given")
    if min_steps < 1:
        raise ValueError("min_steps must be >= 1")
    segs: list[Segment] = []
    sources: dict[str, str] = {}
    for bag in bags:
        run = load_run(bag, contract, allow_unsorted=allow_unsorted)
        s, used = segments_from_run(run, 1.0 / contract.control_dt, action_source)
        sources[str(bag)] = used
        segs += s
    kept = [s for s in segs if len(s.obs) >= min_steps and (not successful_only or (s.result or {}).get("success"))]
    if not kept:
        raise ValueError(f"no usable episode segment of at least {min_steps} steps in {len(bags)} bag(s) "
                         f"({len(segs)} segments before filtering)")
    ends = np.cumsum([len(s.obs) for s in kept])
    sha = write_dataset(
        out,
        obs=np.concatenate([s.obs for s in kept]),
        action=np.concatenate([s.action for s in kept]),
        episode_ends=ends,
        episode_success=np.array([bool((s.result or {}).get("success", False)) for s in kept]),
        episode_side=np.array([side_code((s.result or {}).get("side")) for s in kept], dtype=np.int8),
        episode_seed=np.array([int((s.result or {}).get("seed", -1)) for s in kept], dtype=np.int64),
        task=contract.task,
        obs_names=list(contract.obs_names),
        action_names=list(contract.action_names),
        control_dt=contract.control_dt,
        contract=contract.to_json(),
    )
    return {"out": str(out), "sha256": sha, "rows": int(ends[-1]), "episodes": len(kept),
            "segments_dropped": len(segs) - len(kept), "action_source": sources}
