"""``koopman-distill bench``: batch-1 inference latency of every policy, in one process on one core.

Each student is timed through :class:`~koopman_policy.onnx_policy.OnnxPolicy.predict_action` (input
checks, noise draw and the ONNX call: what the controller pays per chunk). The teacher is timed in PyTorch
with DDPM-100 (the reference; fewer calls, stated in the JSON) and DDIM-k, as its ONNX denoiser in a numpy
DDIM-k loop, and as its unrolled DDIM-k ``policy.onnx``. Pinning the process to one core
(``os.sched_setaffinity``) with one ONNX Runtime and one torch thread gives the "one CPU core" figure and
keeps the runs comparable; every timing comes from the same run on the same machine.

FLOPs per decision (one chunk) come from ``torch.utils.flop_counter.FlopCounterMode`` on the PyTorch model at
batch 1: it counts matrix multiplications and convolutions (2 per multiply-add), which dominate every policy
here; element-wise work is left out. A student's figure is one ``predict_action``; the teacher's is one
denoiser call times its number of steps (100 for DDPM-100, k for DDIM-k), as its sampler spends them.

Models are catalogue names or paths (checkpoint directories or ``.onnx`` files). A checkpoint without its
ONNX files is exported to a temporary directory first, so untrained checkpoints can be benchmarked too.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from torch.utils.flop_counter import FlopCounterMode

from koopman_distill.cli import COMMANDS, UserError
from koopman_distill.contracts import checkpoint_contract
from koopman_policy.base import BasePolicy
from koopman_policy.catalog import PolicyEntry, load_catalog, resolve_policy
from koopman_policy.checkpoint import load_policy
from koopman_policy.onnx_export import export_policy, export_teacher_denoiser
from koopman_policy.onnx_policy import OnnxDenoiserLoop, OnnxPolicy


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help=COMMANDS["bench"])
    p.add_argument("--json", required=True, type=Path, help="where to write the results")
    p.add_argument("--models", nargs="+", default=None,
                   help="catalogue names, checkpoint directories or .onnx files (default: every catalogue "
                        "entry whose files exist)")
    p.add_argument("--task", default=None,
                   help="only the catalogue entries of this task (default: every task); a speedup is always over "
                        "the DDPM-100 teacher of the student's own task")
    p.add_argument("--calls", type=int, default=2000, help="timed calls per one-step model (default 2000)")
    p.add_argument("--ddpm-calls", type=int, default=200, help="timed calls of the DDPM-100 teacher")
    p.add_argument("--teacher-calls", type=int, default=None,
                   help="timed calls of the DDIM-k teacher variants (default: --calls)")
    p.add_argument("--ddim-steps", type=int, default=10, help="k of the DDIM-k teacher variants")
    p.add_argument("--warmup", type=int, default=200, help="untimed calls before timing (DDPM-100: a tenth)")
    p.add_argument("--core", type=int, default=None, help="CPU core to pin to (default: the first allowed)")
    p.add_argument("--no-pin", action="store_true", help="do not pin the process to one core")
    p.add_argument("--intra-op-threads", type=int, default=1)
    p.set_defaults(func=run)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def time_calls(fn: Callable[[], Any], calls: int, warmup: int) -> dict[str, Any]:
    """p50/p99 (ms) of ``calls`` timed calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    gc.collect()
    times = np.empty(calls, np.float64)
    for i in range(calls):
        start = time.perf_counter_ns()
        fn()
        times[i] = time.perf_counter_ns() - start
    ms = times / 1e6
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "mean_ms": float(ms.mean()), "max_ms": float(ms.max()), "calls": calls, "warmup": warmup}


@torch.no_grad()
def flops_per_call(policy: BasePolicy) -> int:
    """FLOPs of one decision of a student, or of one denoiser call of the teacher (batch 1)."""
    c = policy.config
    obs = torch.zeros(1, c.n_obs_steps, c.obs_dim)
    noise = torch.zeros(1, c.horizon, c.action_dim)
    with FlopCounterMode(display=False) as counter:
        if policy.method == "teacher":
            policy.model(noise, torch.tensor(0), policy.encode_obs(obs))
        else:
            policy.predict_action(obs, noise)
    return int(counter.get_total_flops())


def _histories(low: np.ndarray, high: np.ndarray, n_obs_steps: int, count: int = 16) -> np.ndarray:
    """A few raw observation histories inside the normaliser's range, cycled through by the timed calls."""
    rng = np.random.default_rng(0)
    u = rng.uniform(0.1, 0.9, (count, n_obs_steps, low.shape[0])).astype(np.float32)
    return low + u * (high - low)


def _cycle(arr: np.ndarray) -> Callable[[], np.ndarray]:
    state = {"i": 0}

    def nxt() -> np.ndarray:
        state["i"] = (state["i"] + 1) % len(arr)
        return arr[state["i"]]

    return nxt


def _onnx_files(entry: PolicyEntry, tmp: Path) -> tuple[Path | None, Path | None]:
    """The entry's policy and denoiser ONNX files, exported to ``tmp`` from the checkpoint when missing."""
    onnx = entry.onnx if entry.onnx is not None and entry.onnx.is_file() else None
    den = entry.onnx_denoiser if entry.onnx_denoiser is not None and entry.onnx_denoiser.is_file() else None
    need_den = entry.method == "teacher" and den is None
    if (onnx is None or need_den) and entry.checkpoint is not None and entry.checkpoint.is_dir():
        policy = load_policy(entry.checkpoint)
        contract = checkpoint_contract(policy.method, policy.config.to_dict())
        if onnx is None:
            onnx = export_policy(policy, tmp / f"{entry.name}_policy.onnx", contract=contract)
        if need_den:
            den = export_teacher_denoiser(policy, tmp / f"{entry.name}_denoiser.onnx", contract=contract)
    return onnx, den


def _bench_student(entry: PolicyEntry, onnx: Path, args: argparse.Namespace) -> dict[str, Any]:
    policy = OnnxPolicy(onnx, intra_op_threads=args.intra_op_threads)
    m = policy.metadata
    nxt = _cycle(_histories(m.obs_low, m.obs_high, m.n_obs_steps))
    result = time_calls(lambda: policy.predict_action(nxt()), args.calls, args.warmup)
    flops = flops_per_call(load_policy(entry.checkpoint)) if entry.checkpoint is not None else None
    return {**result, "method": m.method, "runtime": "onnxruntime", "provider": policy.provider,
            "flops_per_decision": flops, "file": str(onnx)}


def _bench_image(onnx: Path, args: argparse.Namespace) -> dict[str, Any]:
    """A camera policy (``inputs: image``; the image teacher's file is its unrolled DDIM graph) on random
    frames in [0, 1] and states inside its normaliser's range, through OnnxPolicy."""
    policy = OnnxPolicy(onnx, intra_op_threads=args.intra_op_threads)
    m = policy.metadata
    frames = np.random.default_rng(1).random((16, m.n_obs_steps, *policy.image_size, 3), dtype=np.float32)
    nxt_frames, nxt_states = _cycle(frames), _cycle(_histories(m.obs_low, m.obs_high, m.n_obs_steps))
    result = time_calls(lambda: policy.predict_action(nxt_frames(), nxt_states()), args.calls, args.warmup)
    return {**result, "method": m.method, "inputs": "image", "image_size": list(policy.image_size),
            "runtime": "onnxruntime", "provider": policy.provider, "sampler": m.sampler,
            "steps": m.num_inference_steps, "file": str(onnx)}


def _bench_teacher(entry: PolicyEntry, onnx: Path | None, den: Path | None,
                   args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    k = args.ddim_steps
    teacher_calls = args.teacher_calls or args.calls
    denoiser_flops = None
    if entry.checkpoint is not None and entry.checkpoint.is_dir():
        policy = load_policy(entry.checkpoint)
        denoiser_flops = flops_per_call(policy)
        low, high = (t.numpy() for t in policy.obs_normalizer.bounds())
        hist = torch.from_numpy(_histories(low, high, policy.config.n_obs_steps))
        nxt = _cycle(hist.numpy())
        for sampler, steps, calls, warm in (("ddpm", policy.config.num_train_timesteps, args.ddpm_calls,
                                             max(1, args.warmup // 10)), ("ddim", k, teacher_calls, args.warmup)):
            policy.config = dataclasses.replace(policy.config, sampler=sampler, num_inference_steps=steps)
            res = time_calls(lambda p=policy: p.predict_action(torch.from_numpy(nxt())), calls, warm)
            name = f"{entry.name}_{sampler}{steps}_torch"
            out[name] = {**res, "method": "teacher", "task": entry.task, "runtime": "torch", "sampler": sampler,
                         "steps": steps,
                         "flops_per_decision": denoiser_flops * steps, "torch_threads": torch.get_num_threads(),
                         "file": str(entry.checkpoint)}
    if den is not None:
        loop = OnnxDenoiserLoop(den, intra_op_threads=args.intra_op_threads, sampler="ddim", num_inference_steps=k)
        nxt = _cycle(_histories(loop.metadata.obs_low, loop.metadata.obs_high, loop.metadata.n_obs_steps))
        res = time_calls(lambda: loop.predict_action(nxt()), teacher_calls, args.warmup)
        out[f"{entry.name}_ddim{k}_onnx_denoiser_loop"] = {
            **res, "method": "teacher", "runtime": "onnxruntime+numpy", "provider": loop.provider,
            "sampler": "ddim", "steps": k, "flops_per_decision": denoiser_flops and denoiser_flops * k,
            "file": str(den)}
    if onnx is not None:
        policy_onnx = OnnxPolicy(onnx, intra_op_threads=args.intra_op_threads)
        steps = policy_onnx.metadata.num_inference_steps
        m = policy_onnx.metadata
        nxt = _cycle(_histories(m.obs_low, m.obs_high, m.n_obs_steps))
        res = time_calls(lambda: policy_onnx.predict_action(nxt()), teacher_calls, args.warmup)
        out[f"{entry.name}_ddim{steps}_onnx_unrolled"] = {
            **res, "method": "teacher", "runtime": "onnxruntime", "provider": policy_onnx.provider,
            "sampler": "ddim", "steps": steps, "flops_per_decision": denoiser_flops and denoiser_flops * steps,
            "file": str(onnx)}
    return out


def _pin(args: argparse.Namespace) -> int | None:
    if args.no_pin:
        return None
    allowed = sorted(os.sched_getaffinity(0))
    core = allowed[0] if args.core is None else args.core
    if core not in allowed:
        raise UserError(f"--core {core} is not available to this process (allowed: {allowed})")
    os.sched_setaffinity(0, {core})
    return core


def run(args: argparse.Namespace) -> int:
    if args.calls < 1 or args.ddpm_calls < 1 or args.warmup < 0 or args.ddim_steps < 1:
        raise UserError("--calls, --ddpm-calls and --ddim-steps must be positive, --warmup >= 0")
    if args.models:
        entries = [resolve_policy(name) for name in args.models]
    else:
        catalog = load_catalog()
        entries = [e for e in catalog.policies.values()
                   if any(p is not None and p.exists() for p in (e.checkpoint, e.onnx, e.onnx_denoiser))
                   and args.task in (None, e.task)]
        # An entry naming only another entry's ONNX file (teacher_ddim10) would time the same graph twice.
        entries = [e for e in entries
                   if e.checkpoint is not None or not any(o.checkpoint and o.onnx == e.onnx for o in entries)]
        if not entries:
            raise UserError("no catalogue policy has files yet; pass --models with checkpoint directories")
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        raise UserError(f"model names must be unique, got {names}")
    prev_affinity = os.sched_getaffinity(0)
    core = _pin(args)
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(1 if core is not None else prev_threads)
    results: dict[str, Any] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="koopman-bench-") as tmp:
            for entry in entries:
                onnx, den = _onnx_files(entry, Path(tmp))
                if entry.inputs == "image":
                    if onnx is None:
                        raise UserError(f"{entry.name}: no ONNX file and no checkpoint to export one from")
                    results[entry.name] = _bench_image(onnx, args)
                elif entry.method == "teacher":
                    results.update(_bench_teacher(entry, onnx, den, args))
                elif onnx is None:
                    raise UserError(f"{entry.name}: no ONNX file and no checkpoint to export one from")
                else:
                    results[entry.name] = _bench_student(entry, onnx, args)
                print(f"bench: {entry.name} done")
    finally:
        torch.set_num_threads(prev_threads)
        os.sched_setaffinity(0, prev_affinity)
    # Each task's reference is its teacher's DDPM-100 in PyTorch (the entry with a checkpoint to sample from).
    references = {v["task"]: k for k, v in results.items()
                  if v.get("runtime") == "torch" and v.get("sampler") == "ddpm" and "task" in v}
    for entry in entries:
        if entry.method != "teacher" and entry.inputs == "state":  # the camera policies solve another problem
            r = results[entry.name]
            reference = references.get(entry.task)
            r["task"] = entry.task
            r["teacher"] = reference
            r["speedup_vs_teacher_ddpm100"] = (None if reference is None
                                               else results[reference]["p50_ms"] / r["p50_ms"])
    providers = sorted({v["provider"] for v in results.values() if "provider" in v})
    results["machine"] = {
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count(),
        "pinned_core": core,
        "one_core": core is not None,
        "provider": ", ".join(providers) or None,
        "onnxruntime_version": ort.__version__,
        "torch_version": torch.__version__,
        "intra_op_threads": args.intra_op_threads,
        "torch_threads": 1 if core is not None else prev_threads,
        "python": platform.python_version(),
        "calls": args.calls,
        "ddpm_calls": args.ddpm_calls,
        "note": ("batch 1; one process, same machine; speedup = teacher DDPM-100 (torch) p50 / student p50; "
                 f"DDPM-100 timed over {args.ddpm_calls} calls, the others over --calls"),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    for key, value in results.items():
        if key != "machine":
            speed = value.get("speedup_vs_teacher_ddpm100")
            extra = f"  {speed:.0f}x vs DDPM-100" if speed else ""
            print(f"{key:40s} p50 {value['p50_ms']:8.3f} ms  p99 {value['p99_ms']:8.3f} ms  "
                  f"({value['calls']} calls){extra}")
    print(f"bench: wrote {args.json}")
    return 0
