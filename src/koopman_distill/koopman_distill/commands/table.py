"""``koopman-distill table``: one results table for every task, from ``eval`` and ``bench`` outputs.

The layout follows the OneFlow-DP paper's Push-T table (method, coverage, latency, FLOPs) plus the speedup
over the task's DDPM-100 teacher. Coverage is the task's headline metric: Push-T's mean max coverage, and for
``gen3_reach_obstacle`` (which has no coverage) the success rate, which the table says in its metric column.
Latency and FLOPs are the benchmark's (batch 1, one pinned core, one decision = one action chunk); the
teacher's row is DDPM-100 in PyTorch, the sampler its closed-loop evaluation ran. The targets are checked
per task: the best student's coverage at least the teacher's, and every student at least 100 times faster.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from koopman_distill.cli import UserError

METRIC = {"pusht": ("mean_coverage", "mean max coverage"),
          "gen3_reach_obstacle": ("success_rate", "success rate")}
SPEEDUP_TARGET = 100.0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("table", help="join eval and bench results of every task into one table")
    p.add_argument("--results", nargs=3, action="append", required=True, metavar=("TASK", "EVAL_JSON", "BENCH_JSON"),
                   help="a task with its `eval --json` and `bench --json` files; repeat per task")
    p.add_argument("--json", required=True, type=Path, help="table as JSON; the markdown table is written beside it")
    p.set_defaults(func=run)


def _bench_row(bench: dict[str, Any], name: str, method: str) -> dict[str, Any] | None:
    if method != "teacher":
        return bench.get(name)
    return next((v for k, v in bench.items() if k.startswith(f"{name}_ddpm") and v.get("runtime") == "torch"), None)


def task_rows(task: str, evaluation: dict[str, Any], bench: dict[str, Any]) -> dict[str, Any]:
    """Rows of one task plus its target checks."""
    if task not in METRIC:
        raise UserError(f"no table metric for task {task!r}; known: {', '.join(METRIC)}")
    key, label = METRIC[task]
    rows: dict[str, dict[str, Any]] = {}
    for name, r in evaluation.items():
        if r["method"] == "teacher" and r.get("backend") == "onnx":
            continue  # the teacher's DDIM-k export, evaluated beside the DDPM-100 reference this table uses
        b = _bench_row(bench, name, r["method"])
        if b is None:
            raise UserError(f"{task}: policy {name!r} is in the evaluation but not in the benchmark")
        rows[name] = {"method": r["method"], "coverage": r[key], "success_rate": r["success_rate"],
                      "episodes": r["episodes"], "latency_p50_ms": b["p50_ms"],
                      "flops_per_decision": b.get("flops_per_decision"),
                      "speedup_vs_teacher_ddpm100": b.get("speedup_vs_teacher_ddpm100")}
    teacher = next((r for r in rows.values() if r["method"] == "teacher"), None)
    students = [r for r in rows.values() if r["method"] != "teacher"]
    checks: dict[str, Any] = {}
    if teacher is not None and students:
        best = max(students, key=lambda r: r["coverage"])
        speedups = [r["speedup_vs_teacher_ddpm100"] for r in students if r["speedup_vs_teacher_ddpm100"]]
        checks = {"best_student": best["method"], "best_student_coverage": best["coverage"],
                  "teacher_coverage": teacher["coverage"],
                  "best_student_at_least_teacher": best["coverage"] >= teacher["coverage"],
                  "min_speedup": min(speedups) if speedups else None,
                  f"all_students_{SPEEDUP_TARGET:.0f}x_faster": bool(speedups)
                  and min(speedups) >= SPEEDUP_TARGET and len(speedups) == len(students)}
    return {"coverage_metric": label, "rows": rows, "targets": checks}


def _fmt_flops(flops: int | None) -> str:
    return "–" if flops is None else f"{flops / 1e6:.2f} M"


def markdown(table: dict[str, Any]) -> str:
    lines = ["| task | method | coverage | success | latency p50 (ms, 1 core) | FLOPs / decision "
             "| speedup vs DDPM-100 teacher |", "|---|---|---|---|---|---|---|"]
    for task, t in table.items():
        for r in t["rows"].values():
            speed = r["speedup_vs_teacher_ddpm100"]
            speed_text = "1x (reference)" if r["method"] == "teacher" else f"{speed:.0f}x" if speed else "–"
            lines.append(f"| {task} | {r['method']} | {r['coverage']:.3f} ({t['coverage_metric']}) "
                         f"| {r['success_rate']:.2f} | {r['latency_p50_ms']:.3f} "
                         f"| {_fmt_flops(r['flops_per_decision'])} | {speed_text} |")
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    table: dict[str, Any] = {}
    for task, eval_path, bench_path in args.results:
        evaluation = json.loads(Path(eval_path).read_text())
        bench = json.loads(Path(bench_path).read_text())
        table[task] = {**task_rows(task, evaluation, bench), "eval": eval_path, "bench": bench_path,
                       "machine": bench.get("machine")}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(table, indent=2) + "\n")
    text = markdown(table)
    args.json.with_suffix(".md").write_text(text)
    print(text)
    return 0
