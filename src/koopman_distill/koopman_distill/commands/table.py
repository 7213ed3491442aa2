"""``koopman-distill table``: one results table for every task, from ``eval`` and ``bench`` outputs.

The layout follows the OneFlow-DP paper's Push-T table (method, coverage, latency, FLOPs) plus the speedup
over the task's DDPM-100 teacher. Coverage is the task's headline metric: Push-T's mean max coverage, and for
``gen3_reach_obstacle`` (which has no coverage) the success rate, which the table says in its metric column.
Latency and FLOPs are the benchmark's (batch 1, one pinned core, one decision = one action chunk); the
teacher's row is DDPM-100 in PyTorch, the sampler its closed-loop evaluation ran. The targets are checked
per task: the best student's coverage at least the teacher's, and every student at least 100 times faster.
Reference policies in the evaluation (``hold``, ``random_target``) become rows named after them, without
latency, and are left out of the checks.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from koopman_distill.cli import COMMANDS, UserError

METRIC = {"pusht": ("mean_coverage", "mean max coverage"),
          "gen3_reach_obstacle": ("success_rate", "success rate")}
SPEEDUP_TARGET = 100.0
# The region of a document (docs/results.md) that ``--into`` owns: only the table between these lines is rewritten.
BEGIN, END = "<!-- results-table:begin -->", "<!-- results-table:end -->"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("table", help=COMMANDS["table"])
    p.add_argument("--results", nargs=3, action="append", required=True, metavar=("TASK", "EVAL_JSON", "BENCH_JSON"),
                   help="a task with its `eval --json` and `bench --json` files; repeat per task")
    p.add_argument("--json", required=True, type=Path, help="table as JSON; the markdown table is written beside it")
    p.add_argument("--into", type=Path, metavar="MARKDOWN",
                   help=f"also put the table into this Markdown file, between the lines {BEGIN!r} and {END!r}")
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
        if r["method"] == "reference":  # a model-free reference policy (eval's hold, random_target): no latency
            rows[name] = {"method": name, "coverage": r[key], "success_rate": r["success_rate"],
                          "episodes": r["episodes"], "latency_p50_ms": None, "flops_per_decision": None,
                          "speedup_vs_teacher_ddpm100": None, "reference": True}
            continue
        b = _bench_row(bench, name, r["method"])
        if b is None:
            raise UserError(f"{task}: policy {name!r} is in the evaluation but not in the benchmark")
        rows[name] = {"method": r["method"], "coverage": r[key], "success_rate": r["success_rate"],
                      "episodes": r["episodes"], "latency_p50_ms": b["p50_ms"],
                      "flops_per_decision": b.get("flops_per_decision"),
                      "speedup_vs_teacher_ddpm100": b.get("speedup_vs_teacher_ddpm100")}
    teacher = next((r for r in rows.values() if r["method"] == "teacher"), None)
    students = [r for r in rows.values() if r["method"] != "teacher" and not r.get("reference")]
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
            latency = "–" if r["latency_p50_ms"] is None else f"{r['latency_p50_ms']:.3f}"
            lines.append(f"| {task} | {r['method']} | {r['coverage']:.3f} ({t['coverage_metric']}) "
                         f"| {r['success_rate']:.2f} | {latency} "
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
    if args.into is not None:
        write_into(args.into, text)
    print(text)
    return 0


def write_into(path: Path, text: str) -> None:
    """Replace the table region of ``path``; the document's own words around it stay as they are."""
    if not path.is_file():
        raise UserError(f"--into {path}: no such file")
    doc = path.read_text()
    head, begin, rest = doc.partition(BEGIN)
    _, end, tail = rest.partition(END)
    if not begin or not end:
        raise UserError(f"--into {path}: the file needs the lines {BEGIN} and {END} around the table")
    path.write_text(f"{head}{BEGIN}\n{text}{END}{tail}")
