"""Offline replay: feed a recorded run's observations through policies and compare them, faster than real time.

Observations: by default those the live ingest published (``/policy/observation``, when recorded: exactly
what the live policy saw, including the ingest's reaction to stale input), else rebuilt from ``/joint_states``
and the task topics with the ingest's own core (:mod:`koopman_control.bag.observations`); the rebuild is run in
any case and its agreement with the recorded observations is reported. Each observation is run through every
policy with the live stack's noise convention (a draw per ``(seed, episode, observation stamp)``), and the result
is compared with

* the recorded commands (``/policy/action_chunk``, matched by stamp: a chunk carries its observation's stamp);
* the teacher's chunks for the same observations (computed offline, or the recorded ``/teacher/action_chunk``).

Errors are RMS joint-position differences (rad) over the executed part of a chunk (``n_action_steps`` points
from the observation stamp on). Smoothness is the jerk of the executed sequence: at the policy rate each chunk
executes only its first point before the next one replaces it, so the executed sequence is the first point of
every chunk, and jerk is its third difference / dt^3 (rad/s^3), never taken across an episode start or a gap.
"Plan jerk" is the same over the executed slice inside each chunk. Latency is the wall time of each policy call
here (the compute part of the live latency). Modes: the recorded ``/policy/mode`` time shares, and what the
fallback supervisor would do with this policy's health (OOD score, limits, NaN) on these observations.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from koopman_control.bag.observations import rebuild
from koopman_control.bag.reader import RecordedRun
from koopman_control.core.chunk import ActionChunk
from koopman_control.core.observation import NS
from koopman_control.core.policy_runner import policy_noise
from koopman_control.core.supervisor import FallbackSupervisor, Health, Mode


class ReplayError(ValueError):
    """Policies that cannot be replayed on this bag (unloadable, or disagreeing on rate/joints)."""


@dataclass
class Served:
    """One loaded policy behind the replay's interface, whatever runs it."""

    name: str
    method: str
    source: str
    backend: str
    horizon: int
    n_obs_steps: int
    n_action_steps: int
    control_dt: float
    action_dim: int
    obs_names: list[str]
    is_teacher: bool
    call: Callable[[np.ndarray, list[str], int, int], tuple[np.ndarray | None, float | None, Health]]
    ood_threshold: float | None = None


def _stack_policy(loaded: Any, seed: int) -> Served:
    """The live stack's ``PolicyRunner`` over the ONNX runtime (same health checks and noise as the policy node)."""
    from koopman_control.core.policy_runner import PolicyRunner

    runner = PolicyRunner(loaded.model, loaded.name, str(loaded.source), seed=seed)
    m = runner.meta

    def call(hist: np.ndarray, names: list[str], episode: int,
             stamp: int) -> tuple[np.ndarray | None, float | None, Health]:
        runner.new_episode(episode)
        res = runner.step(hist, names, stamp_ns=stamp)
        chunk = res.chunk
        if chunk is None and res.health.kind == "limits":  # keep the out-of-limits chunk for the error statistics
            chunk = np.asarray(runner.model.predict_action(runner._select(hist, names), noise=runner.noise))
        return chunk, res.ood_score, res.health

    return Served(runner.name, m.method, runner.source, "stack-onnx", m.horizon, m.n_obs_steps, m.n_action_steps,
                  m.control_dt, m.action_dim, list(m.obs_names), runner.is_teacher, call, runner.ood_threshold)


def _offline_policy(loaded: Any, seed: int) -> Served:
    """``koopman_distill.runners`` over a loaded policy (PyTorch checkpoints, or ONNX without the live checks)."""
    try:
        from koopman_distill.runners import runner_for
    except ImportError as err:
        raise ReplayError(f"policy {loaded.name!r}: backend {loaded.backend!r} needs koopman_distill ({err})") from None
    runner = runner_for(loaded)
    name, obs_names = runner.name, list(runner.obs_names)
    perm_cache: dict[tuple[str, ...], np.ndarray] = {}

    def call(hist: np.ndarray, names: list[str], episode: int,
             stamp: int) -> tuple[np.ndarray | None, float | None, Health]:
        key = tuple(names)
        if key not in perm_cache:
            idx = {n: i for i, n in enumerate(names)}
            perm_cache[key] = np.array([idx[n] for n in obs_names])
        noise = policy_noise((runner.horizon, runner.action_dim), seed, episode, stamp)
        obs = hist[-runner.n_obs_steps:, perm_cache[key]].astype(np.float32)
        try:
            chunk = np.asarray(runner.predict_action(obs, noise))
        except Exception as err:
            return None, None, Health(False, f"{name} raised {type(err).__name__}: {err}", "exception")
        if not np.isfinite(chunk).all():
            return chunk, None, Health(False, f"{name} returned NaN/inf actions", "nonfinite")
        return chunk, None, Health(True)

    return Served(name, runner.method, str(loaded.source), runner.backend, runner.horizon, runner.n_obs_steps,
                  runner.n_action_steps, runner.control_dt, runner.action_dim, obs_names,
                  runner.method == "teacher", call)


def load_policy(name: str, backend: str = "stack", seed: int = 0, teacher_steps: int = 10) -> Served:
    """``stack``: the ONNX export through the live stack's runner, or the checkpoint of a policy never exported;
    ``auto``, ``torch``, ``onnx`` as ``koopman_policy.loader.open_policy`` (without the live checks). The name is
    resolved once."""
    from koopman_policy.loader import open_policy

    if backend not in ("stack", "auto", "torch", "onnx"):
        raise ReplayError(f"backend must be stack, auto, torch or onnx, got {backend!r}")
    try:
        loaded = open_policy(name, backend, seed=seed, teacher_steps=teacher_steps)
    except (ValueError, FileNotFoundError, RuntimeError, OSError) as err:  # catalogue, ModelLoadError, ORT
        raise ReplayError(f"policy {name!r}: {err}") from None
    if backend == "stack" and loaded.backend == "onnx":
        return _stack_policy(loaded, seed)
    return _offline_policy(loaded, seed)


# -- statistics ---------------------------------------------------------------------------------------------------
def _summary(v: np.ndarray) -> dict[str, Any]:
    v = np.asarray(v, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return {"count": 0, "mean": None, "p50": None, "p95": None, "p99": None, "max": None}
    p50, p95, p99 = np.percentile(v, [50, 95, 99])
    return {"count": int(v.size), "mean": float(v.mean()), "p50": float(p50), "p95": float(p95), "p99": float(p99),
            "max": float(v.max())}


def _segments(stamps: np.ndarray, episodes: np.ndarray, period_ns: int) -> list[slice]:
    """Runs of consecutive ticks in one episode without a gap (where differences are meaningful)."""
    if len(stamps) == 0:
        return []
    cut = np.flatnonzero((np.diff(stamps) > 1.5 * period_ns) | (np.diff(episodes) != 0)) + 1
    bounds = [0, *cut.tolist(), len(stamps)]
    return [slice(a, b) for a, b in itertools.pairwise(bounds)]


def jerk_stats(actions: np.ndarray, valid: np.ndarray, segments: list[slice], dt: float) -> dict[str, Any]:
    """Third difference / dt^3 of an action sequence within segments; norm over joints per sample."""
    norms = []
    for seg in segments:
        a, ok = actions[seg], valid[seg]
        if len(a) < 4:
            continue
        j = np.diff(a, n=3, axis=0) / dt**3
        good = ok[3:] & ok[2:-1] & ok[1:-2] & ok[:-3]
        norms.append(np.linalg.norm(j[good], axis=1))
    n = np.concatenate(norms) if norms else np.zeros(0)
    out = _summary(n)
    out["rms"] = float(np.sqrt(np.mean(n**2))) if n.size else None
    return out


def plan_jerk(chunks: np.ndarray, valid: np.ndarray, dt: float) -> dict[str, Any]:
    """Jerk inside each chunk's executed slice ``(K, n_action_steps, Da)``."""
    if chunks.shape[1] < 4 or not valid.any():
        return _summary(np.zeros(0)) | {"rms": None}
    j = np.diff(chunks[valid], n=3, axis=1) / dt**3
    n = np.linalg.norm(j, axis=2).ravel()
    return _summary(n) | {"rms": float(np.sqrt(np.mean(n**2)))}


def chunk_errors(pred: np.ndarray, valid: np.ndarray, ref: list[np.ndarray | None]) -> dict[str, Any]:
    """RMS error per tick over the overlapping executed points; aggregate and per-joint statistics."""
    per_tick = np.full(len(ref), np.nan)
    sq_joint: list[np.ndarray] = []
    max_abs = 0.0
    for k, r in enumerate(ref):
        if r is None or not valid[k]:
            continue
        n = min(len(r), pred.shape[1])
        d = pred[k, :n] - r[:n]
        per_tick[k] = float(np.sqrt(np.mean(d**2)))
        sq_joint.append(np.mean(d**2, axis=0))
        max_abs = max(max_abs, float(np.abs(d).max()))
    matched = int(np.isfinite(per_tick).sum())
    out: dict[str, Any] = {"matched": matched, "rmse": None, "max_abs": None, "per_joint_rmse": None,
                           "per_tick": _summary(per_tick)}
    if matched:
        out["rmse"] = float(np.sqrt(np.nanmean(per_tick**2)))
        out["max_abs"] = max_abs
        out["per_joint_rmse"] = np.sqrt(np.mean(sq_joint, axis=0)).tolist()
    return out


def recorded_mode_stats(run: RecordedRun, end_ns: int) -> dict[str, Any]:
    """Time share of each mode on the recorded ``/policy/mode`` (latched: a value holds until the next)."""
    if not run.modes:
        return {"recorded": False}
    share: dict[str, float] = {}
    ends = [*run.modes[1:], (max(end_ns, run.modes[-1][0]), "")]
    for (t, mode), nxt in zip(run.modes, ends, strict=True):
        share[mode] = share.get(mode, 0.0) + max(0, nxt[0] - t) / NS
    total = sum(share.values()) or 1.0
    return {"recorded": True, "transitions": len(run.modes) - 1, "seconds": share,
            "fraction": {k: v / total for k, v in share.items()}, "final": run.modes[-1][1]}


# -- the replay ---------------------------------------------------------------------------------------------------
@dataclass
class PolicyTrace:
    """Per-tick outputs of one policy, kept for the plots."""

    served: Served
    chunks: np.ndarray  # (K, n_action_steps, Da) executed slice, NaN where no output
    valid: np.ndarray  # (K,) bool
    ood: np.ndarray  # (K,) NaN where none
    latency_ms: np.ndarray  # (K,)
    err_recorded: np.ndarray  # (K,) per-tick RMSE, NaN where unmatched
    err_teacher: np.ndarray
    modes: list[str]
    wall_s: float


@dataclass
class ReplayResult:
    summary: dict[str, Any]
    stamps_ns: np.ndarray
    episodes: np.ndarray
    recorded: np.ndarray  # (K, n_action_steps, Da) recorded executed points, NaN where none
    recorded_valid: np.ndarray
    traces: dict[str, PolicyTrace] = field(default_factory=dict)


def _executed(chunk: np.ndarray, served: Served) -> np.ndarray:
    s = served.n_obs_steps - 1
    return chunk[s: s + served.n_action_steps]


def replay(run: RecordedRun, policies: Sequence[str], *, teacher: str = "auto", backend: str = "stack",
           seed: int = 0, teacher_steps: int = 10, fallback: bool = True, recover_ticks: int = 10,
           obs_source: str = "auto", progress: Callable[[str], None] | None = None) -> ReplayResult:
    """Run every policy over the run's observations; see the module docstring for the metrics."""
    if not policies:
        raise ReplayError("no policies given")
    say = progress or (lambda _msg: None)
    loaded = [load_policy(name, backend, seed, teacher_steps) for name in policies]
    short = [s.name for s in loaded]
    # Reported under their resolved names (a path's file stem), unless two would collide.
    labels = short if len(set(short)) == len(short) else list(policies)
    served = dict(zip(labels, loaded, strict=True))
    dts = {round(s.control_dt, 9) for s in served.values()}
    if len(dts) != 1:
        raise ReplayError(f"policies run at different rates (control_dt {sorted(dts)}); replay them separately")
    dt = dts.pop()
    teacher_served: Served | None = None
    teacher_source = "none"
    if teacher == "auto":
        found = [s for s in served.values() if s.is_teacher]
        if found:
            teacher_served, teacher_source = found[0], f"offline:{found[0].name}"
        else:
            try:
                teacher_served = load_policy("teacher", backend, seed, teacher_steps)
                teacher_source = "offline:teacher"
            except (ReplayError, ValueError, FileNotFoundError):
                teacher_source = "recorded" if run.teacher_chunks else "none"
    elif teacher not in ("none", "recorded"):
        same = [x for given, x in zip(policies, loaded, strict=True) if teacher in (given, x.name)]
        teacher_served = same[0] if same else load_policy(teacher, backend, seed, teacher_steps)
        teacher_source = f"offline:{teacher_served.name}"
    elif teacher == "recorded":
        if not run.teacher_chunks:
            raise ReplayError(f"{run.path}: --teacher recorded, but the bag has no /teacher/action_chunk messages")
        teacher_source = "recorded"
    if teacher_served is not None and round(teacher_served.control_dt, 9) != dt:
        raise ReplayError(f"teacher {teacher_served.name!r} runs at control_dt {teacher_served.control_dt}, the "
                          f"policies at {dt}")
    n_obs = max(s.n_obs_steps for s in [*served.values(), *([teacher_served] if teacher_served else [])])
    n_act = min(s.n_action_steps for s in served.values())
    from koopman_sim.tasks.reach_obstacle import OBS_NAMES

    rb = rebuild(run, n_obs, 1.0 / dt)
    if obs_source not in ("auto", "recorded", "rebuild"):
        raise ReplayError(f"obs_source must be auto, recorded or rebuild, got {obs_source!r}")
    if obs_source == "recorded" and not run.observations:
        raise ReplayError(f"{run.path}: --obs-source recorded, but the bag has no /policy/observation messages")
    use_recorded = obs_source == "recorded" or (obs_source == "auto" and bool(run.observations))
    ticks: list[tuple[int, np.ndarray, list[str], int]]  # (stamp, history, column names, episode)
    if use_recorded:
        short_hist = min(o.history.shape[0] for o in run.observations)
        if short_hist < n_obs:
            raise ReplayError(f"{run.path}: the recorded observations have {short_hist} steps, a policy needs {n_obs}; "
                              "replay with --obs-source rebuild")
        ticks = [(o.stamp_ns, o.history, list(o.names), o.episode) for o in run.observations]
    else:
        names = list(OBS_NAMES)
        ticks = [(o.stamp_ns, o.history, names, o.episode) for o in rb.observations]
    if not ticks:
        raise ReplayError(f"{run.path}: no observation could be built at {1 / dt:g} Hz (builder says: "
                          f"{rb.builder.reason}); is the bag long enough and are target/pillar recorded?")
    k_total = len(ticks)
    stamps = np.array([t[0] for t in ticks], dtype=np.int64)
    episodes = np.array([t[3] for t in ticks], dtype=np.int64)
    segments = _segments(stamps, episodes, round(dt * NS))

    def ref_from(chunks: list[ActionChunk]) -> list[np.ndarray | None]:
        by_stamp = {c.stamp_ns: c for c in chunks}
        out: list[np.ndarray | None] = []
        for st in stamps.tolist():
            c = by_stamp.get(st)
            if c is None:
                out.append(None)
                continue
            keep = (c.times_ns >= st) & (c.times_ns < st + round(n_act * dt * NS) - 1000)
            out.append(c.positions[keep] if keep.any() else None)
        return out

    recorded_ref = ref_from(run.chunks)
    da = len(run.joint_names)
    rec_arr = np.full((k_total, n_act, da), np.nan)
    for k, r in enumerate(recorded_ref):
        if r is not None:
            rec_arr[k, : min(len(r), n_act)] = r[:n_act]
    rec_valid = np.array([r is not None for r in recorded_ref])

    # Observation check: the rebuilt observations against what the live ingest published. Disagreement means
    # the live ingest saw something the recorded stamps do not show (a stale-input fault, dropped samples).
    obs_check: dict[str, Any] = {"source": "recorded" if use_recorded else "rebuilt",
                                 "recorded": bool(run.observations), "rebuilt_count": len(rb.observations)}
    if run.observations:
        rec_obs = {o.stamp_ns: o for o in run.observations}
        diffs = [float(np.abs(rec_obs[o.stamp_ns].history[-o.history.shape[0]:] - o.history).max())
                 for o in rb.observations if o.stamp_ns in rec_obs
                 and rec_obs[o.stamp_ns].history.shape[0] >= o.history.shape[0]]
        # Recording starts and stops while the stack runs: compare counts over the recorded observations' span.
        lo, hi = min(rec_obs), max(rec_obs)
        obs_check.update(recorded_count=len(run.observations), matched=len(diffs),
                         rebuilt_in_span=sum(lo <= o.stamp_ns <= hi for o in rb.observations),
                         identical=sum(d == 0.0 for d in diffs), max_abs_diff=max(diffs) if diffs else None)

    teacher_ref: list[np.ndarray | None] = [None] * k_total
    teacher_trace: PolicyTrace | None = None

    def run_policy(s: Served) -> PolicyTrace:
        say(f"replaying {s.name} ({s.backend}) over {k_total} observations")
        chunks = np.full((k_total, s.n_action_steps, s.action_dim), np.nan)
        valid = np.zeros(k_total, bool)
        ood = np.full(k_total, np.nan)
        lat = np.zeros(k_total)
        sup = FallbackSupervisor(fallback, recover_ticks)
        sup.select(s.is_teacher)
        modes: list[str] = []
        t_start = time.perf_counter()
        for k, (stamp, hist, names, episode) in enumerate(ticks):
            t0 = time.perf_counter()
            chunk, score, health = s.call(hist, names, episode, stamp)
            lat[k] = (time.perf_counter() - t0) * 1e3
            if chunk is not None and chunk.shape == (s.horizon, s.action_dim):
                chunks[k] = _executed(chunk, s)
                valid[k] = bool(np.isfinite(chunks[k]).all())
            if score is not None:
                ood[k] = score
            modes.append(sup.update(health, stamp).value)
        wall = time.perf_counter() - t_start
        nan = np.full(k_total, np.nan)
        return PolicyTrace(s, chunks, valid, ood, lat, nan.copy(), nan.copy(), modes, wall)

    if teacher_served is not None:
        teacher_trace = run_policy(teacher_served)
        teacher_ref = [teacher_trace.chunks[k] if teacher_trace.valid[k] else None for k in range(k_total)]
    elif teacher_source == "recorded":
        teacher_ref = ref_from(run.teacher_chunks)

    result = ReplayResult({}, stamps, episodes, rec_arr, rec_valid)
    duration_s = float(stamps[-1] - stamps[0]) / NS + dt if k_total else 0.0
    report: dict[str, Any] = {}
    for name, s in served.items():
        tr = teacher_trace if teacher_trace is not None and s is teacher_served else run_policy(s)
        ex = tr.chunks[:, :n_act]
        e_rec = chunk_errors(ex, tr.valid, recorded_ref)
        e_teach = chunk_errors(ex, tr.valid, teacher_ref) if teacher_source != "none" else None
        for k in range(k_total):
            for ref, arr in ((recorded_ref[k], tr.err_recorded), (teacher_ref[k], tr.err_teacher)):
                if ref is not None and tr.valid[k]:
                    n = min(len(ref), n_act)
                    arr[k] = float(np.sqrt(np.mean((ex[k, :n] - ref[:n]) ** 2)))
        counts: dict[str, int] = {}
        for m in tr.modes:
            counts[m] = counts.get(m, 0) + 1
        thr = s.ood_threshold
        ood_vals = tr.ood[np.isfinite(tr.ood)]
        report[name] = {
            "method": s.method, "source": s.source, "backend": s.backend,
            "error_vs_recorded": e_rec,
            "error_vs_teacher": e_teach,
            "jerk_executed": jerk_stats(tr.chunks[:, 0], tr.valid, segments, dt),
            "jerk_plan": plan_jerk(tr.chunks, tr.valid, dt),
            "latency_ms": _summary(tr.latency_ms),
            "modes": {"ticks": counts, "fraction": {m: c / k_total for m, c in counts.items()},
                      "fallback_events": sum(1 for a, b in zip(tr.modes, tr.modes[1:], strict=False)
                                             if a == Mode.STUDENT.value and b != a)},
            "ood": {**_summary(ood_vals), "threshold": thr} if ood_vals.size else None,
            "outputs": int(tr.valid.sum()),
            "replay": {"wall_s": tr.wall_s, "calls_per_s": k_total / tr.wall_s if tr.wall_s > 0 else None,
                       "realtime_factor": duration_s / tr.wall_s if tr.wall_s > 0 else None},
        }
        result.traces[name] = tr
    rec_first = np.where(rec_valid[:, None], rec_arr[:, 0], np.nan)
    b = rb.builder
    result.summary = {
        "bag": run.info.to_dict(),
        "policy_rate_hz": 1.0 / dt, "n_obs_steps": n_obs, "n_action_steps": n_act, "ticks": k_total,
        "episodes": sorted({int(e) for e in episodes.tolist()}), "duration_s": duration_s,
        "ingest": {"emitted": b.emitted, "missed_ticks": b.missed_ticks, "faults": b.faults,
                   "history_gaps": b.history.gaps,
                   "dropped_out_of_order": b.dropped + sum(run.dropped_unsorted.values())},
        "observation_check": obs_check,
        "recorded": {"chunks": len(run.chunks), "matched_ticks": int(rec_valid.sum()),
                     "jerk_executed": jerk_stats(rec_first, rec_valid, segments, dt),
                     "modes": recorded_mode_stats(run, int(run.js_log_ns[-1])),
                     "episode_results": [{k: v for k, v in r.items() if not k.startswith("_")} for r in run.results]},
        "teacher": {"source": teacher_source},
        "policies": report,
    }
    return result
