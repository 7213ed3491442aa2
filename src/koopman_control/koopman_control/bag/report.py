"""Replay results as files a person reads (markdown + PNG plots) and a machine reads (JSON)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from koopman_control.bag.replay import ReplayResult
from koopman_control.core.observation import NS


def _f(v: Any, fmt: str = ".4g") -> str:
    return "–" if v is None else format(v, fmt)


def markdown(res: ReplayResult, plots: dict[str, str]) -> str:
    s = res.summary
    b = s["bag"]
    lines = [
        f"# Offline replay of `{Path(b['path']).name}`",
        "",
        f"- bag: `{b['path']}` ({b['storage']}, {b['size_bytes'] / 1e6:.2f} MB, {b['message_count']} messages, "
        f"{b['duration_s']:.1f} s)",
        f"- {s['ticks']} observations at {s['policy_rate_hz']:g} Hz over {s['duration_s']:.1f} s, episodes "
        f"{', '.join(map(str, s['episodes']))}; history {s['n_obs_steps']} steps, {s['n_action_steps']} executed "
        "actions per chunk",
        f"- ingest: {s['ingest']['missed_ticks']} missed ticks, {s['ingest']['history_gaps']} history gaps, "
        f"{s['ingest']['faults']} input faults, {s['ingest']['dropped_out_of_order']} out-of-order samples dropped",
    ]
    oc = s["observation_check"]
    if oc.get("recorded"):
        lines.append(f"- rebuilt observations vs recorded `/policy/observation`: {oc['matched']} of "
                     f"{oc['recorded_count']} matched by stamp, {oc['identical']} identical, max |diff| "
                     f"{_f(oc['max_abs_diff'])} (replayed: {oc['source']})")
    rec = s["recorded"]
    lines.append(f"- recorded commands: {rec['chunks']} chunks, {rec['matched_ticks']} matched to ticks; executed jerk "
                 f"RMS {_f(rec['jerk_executed']['rms'])} rad/s³")
    modes = rec["modes"]
    if modes.get("recorded"):
        share = ", ".join(f"{k} {v:.1%}" for k, v in modes["fraction"].items())
        lines.append(f"- recorded modes: {share}; {modes['transitions']} transitions")
    lines.append(f"- teacher reference: {s['teacher']['source']}")
    lines += ["", "| policy | method | RMSE vs recorded (rad) | max err | RMSE vs teacher | jerk RMS (rad/s³) | "
              "plan jerk RMS | latency p50 / p99 (ms) | student share | OOD p95 / thr | × real time |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, p in s["policies"].items():
        er, et = p["error_vs_recorded"], p["error_vs_teacher"] or {}
        lat, ood = p["latency_ms"], p["ood"] or {}
        frac = p["modes"]["fraction"]
        share = frac.get("student", frac.get("teacher", 0.0))
        lines.append(
            f"| {name} | {p['method']} | {_f(er['rmse'])} | {_f(er['max_abs'])} | {_f(et.get('rmse'))} | "
            f"{_f(p['jerk_executed']['rms'])} | {_f(p['jerk_plan']['rms'])} | {_f(lat['p50'], '.3f')} / "
            f"{_f(lat['p99'], '.3f')} | {share:.0%} | {_f(ood.get('p95'))} / {_f(ood.get('threshold'))} | "
            f"{_f(p['replay']['realtime_factor'], '.0f')} |")
    lines += ["", "RMSE: joint-position error over the executed part of each chunk, matched by observation stamp. "
              "Jerk: third difference of the executed (first) action of consecutive chunks / dt³. Latency: wall "
              "time of one policy call in this replay. Student share: ticks the fallback supervisor would leave to "
              "the policy given its health on these observations.", ""]
    for title, path in plots.items():
        lines += [f"## {title}", "", f"![{title}]({Path(path).name})", ""]
    return "\n".join(lines)


def plot(res: ReplayResult, out_dir: Path, joint_names: list[str]) -> dict[str, str]:
    """actions.png (executed action per joint over time), errors.png (histograms), latency.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out: dict[str, str] = {}
    t = (res.stamps_ns - res.stamps_ns[0]) / NS if len(res.stamps_ns) else np.zeros(0)
    n_j = res.recorded.shape[2]
    fig, axes = plt.subplots(n_j, 1, figsize=(10, 1.6 * n_j), sharex=True)
    axes = np.atleast_1d(axes)
    rec_first = np.where(res.recorded_valid[:, None], res.recorded[:, 0], np.nan)
    for j, ax in enumerate(axes):
        ax.plot(t, rec_first[:, j], "k-", lw=2.0, alpha=0.5, label="recorded")
        for name, tr in res.traces.items():
            ax.plot(t, np.where(tr.valid, tr.chunks[:, 0, j], np.nan), lw=1.0, label=name)
        ax.set_ylabel(joint_names[j] if j < len(joint_names) else f"j{j}", fontsize=8)
    axes[0].legend(fontsize=7, ncol=4, loc="upper right")
    axes[-1].set_xlabel("time (s)")
    fig.suptitle("executed joint targets (rad)")
    fig.tight_layout()
    out["Executed actions"] = str(out_dir / "actions.png")
    fig.savefig(out["Executed actions"], dpi=90)
    plt.close(fig)

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.5))
    for name, tr in res.traces.items():
        for ax, err in ((a1, tr.err_recorded), (a2, tr.err_teacher)):
            e = err[np.isfinite(err)]
            if e.size:
                ax.hist(e, bins=30, alpha=0.6, label=name)
    a1.set_title("RMSE vs recorded commands (rad)")
    a2.set_title("RMSE vs teacher (rad)")
    for ax in (a1, a2):
        ax.set_xlabel("per-tick RMSE")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    out["Error histograms"] = str(out_dir / "errors.png")
    fig.savefig(out["Error histograms"], dpi=90)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, tr in res.traces.items():
        v = np.sort(tr.latency_ms)
        if v.size:
            ax.plot(v, np.arange(1, v.size + 1) / v.size, label=name)
    ax.set_xscale("log")
    ax.set_xlabel("policy call (ms)")
    ax.set_ylabel("fraction of calls")
    ax.set_title("latency distribution (CDF)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    out["Latency"] = str(out_dir / "latency.png")
    fig.savefig(out["Latency"], dpi=90)
    plt.close(fig)
    return out


def write_report(res: ReplayResult, out_dir: str | Path, joint_names: list[str], plots: bool = True) -> dict[str, str]:
    """Write report.md, report.json and the plots into ``out_dir``; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    figs = plot(res, out_dir, joint_names) if plots else {}
    files = {"markdown": str(out_dir / "report.md"), "json": str(out_dir / "report.json"), **figs}
    Path(files["json"]).write_text(json.dumps(res.summary, indent=2) + "\n")
    Path(files["markdown"]).write_text(markdown(res, figs))
    return files
