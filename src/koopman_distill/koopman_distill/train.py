"""One training loop for the teacher and every student.

AdamW with linear warm-up and cosine decay, an EMA copy of the weights (Diffusion Policy's schedule:
power 0.75, at most 0.9999), seeded batches, periodic resumable state, and PyTorch DDP when started
under ``torchrun`` (gloo on CPU, NCCL on GPU): each rank draws its own batches, gradients are averaged,
rank 0 writes files. The resumable state is safetensors plus JSON, like every checkpoint here.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from koopman_policy.base import BasePolicy

STATE_WEIGHTS = "train_state.safetensors"
STATE_META = "train_state.json"


@dataclass
class TrainConfig:
    steps: int = 5000
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-6
    warmup_steps: int = 200
    ema: bool = True
    ema_power: float = 0.75
    ema_max: float = 0.9999
    seed: int = 0
    save_every: int = 1000
    demo_batch_size: int = 128


class EMA:
    """Exponential moving average of a model's parameters with Diffusion Policy's warm-up."""

    def __init__(self, model: torch.nn.Module, power: float, max_decay: float) -> None:
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.power, self.max_decay = power, max_decay

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        decay = min(self.max_decay, max(0.0, 1.0 - (1.0 + step) ** -self.power))
        for p_ema, p in zip(self.model.parameters(), model.parameters(), strict=True):
            p_ema.lerp_(p.detach(), 1.0 - decay)
        for b_ema, b in zip(self.model.buffers(), model.buffers(), strict=True):
            b_ema.copy_(b)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def distributed() -> tuple[int, int]:
    """(rank, world size); initialises the process group when started by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def is_main_process() -> bool:
    """Rank 0 (or a single process) writes the files; read from torchrun's environment, valid after teardown."""
    return int(os.environ.get("RANK", "0")) == 0


def _ranks_agree(policy: BasePolicy) -> bool:
    """DDP must leave every rank with the same weights: compare a checksum across ranks."""
    checksum = torch.stack([p.detach().double().sum() for p in policy.parameters()]).sum().reshape(1)
    gathered = [torch.zeros_like(checksum) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, checksum)
    values = torch.cat(gathered)
    return bool((values.max() - values.min()).abs() <= 1e-9 * values.abs().max().clamp_min(1.0))


def _save_state(out: Path, policy: BasePolicy, ema: EMA | None, opt: torch.optim.Optimizer, step: int,
                losses: list[float], gen: torch.Generator) -> None:
    tensors = {f"model.{k}": v.detach().contiguous() for k, v in policy.state_dict().items()}
    tensors["rng.torch"] = torch.get_rng_state()
    tensors["rng.batches"] = gen.get_state()
    if ema is not None:
        tensors |= {f"ema.{k}": v.detach().contiguous() for k, v in ema.model.state_dict().items()}
    for i, state in opt.state_dict()["state"].items():
        for name, value in state.items():
            tensors[f"opt.{i}.{name}"] = torch.as_tensor(value).detach().contiguous()
    tmp = out / (STATE_WEIGHTS + ".partial")
    save_file(tensors, str(tmp))
    tmp.replace(out / STATE_WEIGHTS)
    (out / STATE_META).write_text(json.dumps({"step": step, "losses": losses}))


def _load_state(out: Path, policy: BasePolicy, ema: EMA | None, opt: torch.optim.Optimizer,
                gen: torch.Generator) -> tuple[int, list]:
    """Restore weights, optimiser and both random streams, so a resumed run equals an uninterrupted one."""
    tensors = load_file(str(out / STATE_WEIGHTS))
    meta = json.loads((out / STATE_META).read_text())
    torch.set_rng_state(tensors.pop("rng.torch"))
    gen.set_state(tensors.pop("rng.batches"))

    def section(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

    policy.load_state_dict(section("model."))
    if ema is not None:
        ema.model.load_state_dict(section("ema."))
    opt_state = opt.state_dict()
    for key, value in section("opt.").items():
        index, name = key.split(".", 1)
        opt_state["state"].setdefault(int(index), {})[name] = value
    opt.load_state_dict(opt_state)
    return int(meta["step"]), list(meta["losses"])


def train(
    policy: BasePolicy,
    tensors: dict[str, torch.Tensor],
    cfg: TrainConfig,
    out: str | Path,
    resume: bool = False,
    desc: str = "train",
    demos: dict[str, torch.Tensor] | None = None,
) -> tuple[BasePolicy, dict[str, float]]:
    """Train ``policy`` on random batches of ``tensors``; returns the EMA (or final) policy and metrics.

    ``demos`` (demonstration windows, of another length than ``tensors``) are drawn independently,
    ``cfg.demo_batch_size`` per step, and reach the policy under ``demo_`` keys.
    """
    out = Path(out)
    rank, world = distributed()
    torch.manual_seed(cfg.seed)
    n = len(next(iter(tensors.values())))
    n_demos = len(next(iter(demos.values()))) if demos else 0
    if n < 1 or (demos is not None and n_demos < 1):
        raise ValueError("no training samples")
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    ema = EMA(policy, cfg.ema_power, cfg.ema_max) if cfg.ema else None
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + rank)
    start, losses = 0, []
    if resume and (out / STATE_WEIGHTS).is_file():
        start, losses = _load_state(out, policy, ema, opt, gen)
    model: torch.nn.Module = DistributedDataParallel(policy) if world > 1 else policy
    policy.train()
    began = time.perf_counter()
    bar = tqdm(range(start, cfg.steps), desc=desc, disable=rank != 0, dynamic_ncols=True, initial=start,
               total=cfg.steps)
    for step in bar:
        idx = torch.randint(0, n, (cfg.batch_size,), generator=gen)
        batch = {k: v[idx] for k, v in tensors.items()}
        if demos:
            jdx = torch.randint(0, n_demos, (cfg.demo_batch_size,), generator=gen)
            batch |= {f"demo_{k}": v[jdx] for k, v in demos.items()}
        loss = model(batch)
        for group in opt.param_groups:
            group["lr"] = cfg.lr * lr_factor(step, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        policy.on_train_step()
        if ema is not None:
            ema.update(policy, step)
        losses.append(float(loss.detach()))
        if step % 50 == 0:
            bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
        if rank == 0 and (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
            out.mkdir(parents=True, exist_ok=True)
            _save_state(out, policy, ema, opt, step + 1, losses, gen)
    final = ema.model if ema is not None else policy
    tail = losses[-200:] or [float("nan")]
    extra: dict[str, bool] = {}
    if world > 1:
        extra["ranks_agree"] = _ranks_agree(policy)
        del model  # DDP's reducer holds the process group: destroying the group under it hangs at exit
        dist.destroy_process_group()
    metrics = {
        "final_loss": sum(tail) / len(tail),
        "steps": cfg.steps,
        "train_seconds": round(time.perf_counter() - began, 1),
        "world_size": world,
        **extra,
        **{f"train_{k}": v for k, v in asdict(cfg).items()},
    }
    return final.eval(), metrics
