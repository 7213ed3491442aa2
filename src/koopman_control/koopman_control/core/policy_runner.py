"""One loaded policy and every check the control loop wraps around a call to it.

A student (or the teacher) is served from its ONNX export through :class:`OnnxPolicy` (or the teacher's
denoiser through :class:`OnnxDenoiserLoop` when only that exists). Each call's output is judged here:
exception, wrong shape, NaN/inf, actions outside the joint limits, a missed deadline, or an out-of-
distribution score above the threshold all make the tick unhealthy, with a reason a person can act on.

Noise (``noise_per``): ``decision`` (default) draws it afresh for every plan from ``(seed, episode, stamp)``
of the observation, as Diffusion Policy samples and as the offline evaluation runs the students; a held noise
makes a one-step policy a fixed map of the observation, which can park the hand short of the target (the
Gen3 oneflow student over 100 gym episodes: 0.92 success held, 1.00 redrawn, no collision either way). Keyed
on the stamp, a replay of a recorded run draws the same noise whatever else it calls. ``episode`` holds one
draw per ``(seed, episode)``.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from koopman_control.core.supervisor import HEALTHY, Health
from koopman_policy.contract import Contract


class PolicyLoadError(ValueError):
    """A policy that cannot be served: unknown name, missing or corrupt file, or wrong interface."""


@dataclass
class StepResult:
    chunk: np.ndarray | None  # (H, Da) raw joint positions, None when the call failed
    ood_score: float | None
    compute_s: float
    health: Health


def load_model(name_or_path: str | None, *, root: str | Path | None = None, intra_op_threads: int = 1,
               seed: int = 0, teacher_steps: int = 10, providers: Sequence[str] | None = None,
               ) -> tuple[Any, str, str]:
    """Resolve a catalogue name or path and open its ONNX export; returns (model, name, file).

    ``koopman_policy.loader.open_policy`` resolves the name once and picks the runtime from the file's metadata
    (a one-step policy, state or camera; a teacher always from its denoiser, in a numpy DDIM-``teacher_steps``
    loop, where it has one); no torch
    is imported. ``providers`` defaults to OnnxPolicy's preference order; the nodes pass CPU only by default,
    because for these small graphs a GPU's launch and copy overhead costs more than the compute it saves.
    """
    from koopman_policy.loader import open_policy

    try:
        loaded = open_policy(name_or_path or None, "onnx", root=root, providers=providers,
                             intra_op_threads=intra_op_threads, seed=seed, teacher_steps=teacher_steps,
                             teacher_from_denoiser=True)
    except (ValueError, RuntimeError, OSError) as err:  # catalogue and ModelLoadError; ORT raises RuntimeErrors
        raise PolicyLoadError(str(err)) from None
    return loaded.model, loaded.name, str(loaded.source)


NOISE_PER = ("decision", "episode")


def policy_noise(shape: tuple[int, int], seed: int, episode: int, stamp_ns: int | None = None) -> np.ndarray:
    """The stack's noise: one draw per ``(seed, episode)``, or per ``(seed, episode, stamp)`` for a decision.

    Keyed rather than taken from a running generator, so a replay of a recorded run draws the same noise
    whatever else it calls.
    """
    key = [int(seed), int(episode)] + ([int(stamp_ns)] if stamp_ns is not None else [])
    return np.random.default_rng(key).standard_normal(shape, dtype=np.float32)


class PolicyRunner:
    """A model plus its health checks, noise and observation layout."""

    def __init__(self, model: Any, name: str, source: str, *, seed: int = 0, ood_threshold: float | None = None,
                 limit_margin: float = 0.0, noise_per: str = "decision") -> None:
        if noise_per not in NOISE_PER:
            raise PolicyLoadError(f"noise must be one of {', '.join(NOISE_PER)}, got {noise_per!r}")
        self.noise_per = noise_per
        self.model = model
        self.name = name
        self.source = source
        self.meta = model.metadata
        self.seed = int(seed)
        self.limit_margin = float(limit_margin)
        m = self.meta
        self.is_teacher = m.method == "teacher"
        self.ood_threshold = ood_threshold if ood_threshold is not None and ood_threshold > 0 else m.ood_threshold
        self.lower = np.asarray(m.action_limit_low, dtype=np.float64) - self.limit_margin
        self.upper = np.asarray(m.action_limit_high, dtype=np.float64) + self.limit_margin
        # Camera policies also read an image history (To, h, w, 3) in [0, 1] from the camera ingest.
        self.image_size: tuple[int, int] | None = getattr(model, "image_size", None)
        self.episode: int | None = None
        self.noise = np.zeros((m.horizon, m.action_dim), np.float32)
        self._perm_cache: dict[tuple[str, ...], np.ndarray] = {}
        self.new_episode(0)

    @classmethod
    def load(cls, name_or_path: str | None, *, root: str | Path | None = None, intra_op_threads: int = 1,
             seed: int = 0, teacher_steps: int = 10, ood_threshold: float | None = None,
             limit_margin: float = 0.0, providers: Sequence[str] | None = None,
             noise_per: str = "decision") -> PolicyRunner:
        model, name, source = load_model(name_or_path, root=root, intra_op_threads=intra_op_threads, seed=seed,
                                         teacher_steps=teacher_steps, providers=providers)
        return cls(model, name, source, seed=seed, ood_threshold=ood_threshold, limit_margin=limit_margin,
                   noise_per=noise_per)

    # -- interface checks ----------------------------------------------------------------------------------
    def check_contract(self, served: Contract, history_steps: int) -> None:
        """Raise PolicyLoadError unless the stack serving ``served`` can feed this model and drive its joints:
        every observation feature it needs from the same source, the same action joints (in order)."""
        mine = getattr(self.meta, "contract", None)
        if mine is None:
            raise PolicyLoadError(f"policy {self.name!r} carries no observation and action contract: re-export "
                                  "it from its checkpoint (koopman-distill export --checkpoint DIR)")
        missing = mine.missing_from(served)
        if missing:
            raise PolicyLoadError(f"policy {self.name!r} (task {mine.task}) needs what this stack (task "
                                  f"{served.task}) does not serve: " + "; ".join(missing))
        if mine.action_joints != served.action_joints:
            raise PolicyLoadError(f"policy {self.name!r} drives {list(mine.action_joints)}, the robot takes "
                                  f"{list(served.action_joints)}")
        m = self.meta
        if m.n_obs_steps > history_steps:
            raise PolicyLoadError(
                f"policy {self.name!r} needs {m.n_obs_steps} observation steps, the ingest provides {history_steps}")
        if not m.control_dt > 0:
            raise PolicyLoadError(f"policy {self.name!r}: control_dt {m.control_dt} is not positive")

    def probe(self, history: np.ndarray, names: Sequence[str], calls: int = 3,
              image: np.ndarray | None = None) -> float:
        """Run a real observation through the model; raise PolicyLoadError if the output is unusable.

        A camera policy without a real image yet is probed on a uniform grey history. Returns the median
        call time in seconds (the caller compares it with its deadline).
        """
        if self.image_size is not None and (image is None or image.shape[1:3] != self.image_size):
            image = np.full((self.meta.n_obs_steps, *self.image_size, 3), 0.5, np.float32)
        times = []
        for _ in range(calls):
            res = self.step(history, names, image=image)
            if not res.health.ok and res.health.kind != "ood":
                raise PolicyLoadError(f"policy {self.name!r} fails on the current observation: {res.health.reason}")
            times.append(res.compute_s)
        return float(np.median(times))

    # -- control -------------------------------------------------------------------------------------------
    def new_episode(self, episode: int) -> None:
        if episode != self.episode:
            self.episode = int(episode)
            self.noise = policy_noise(self.noise.shape, self.seed, episode)

    def _select(self, history: np.ndarray, names: Sequence[str]) -> np.ndarray:
        key = tuple(names)
        perm = self._perm_cache.get(key)
        if perm is None:
            index = {n: i for i, n in enumerate(names)}
            missing = [n for n in self.meta.obs_names if n not in index]
            if missing:
                raise ValueError(f"observation lacks {', '.join(missing)}")
            perm = np.array([index[n] for n in self.meta.obs_names])
            self._perm_cache[key] = perm
        to = self.meta.n_obs_steps
        if history.ndim != 2 or history.shape[0] < to:
            raise ValueError(f"observation history {history.shape} has fewer than {to} steps")
        return history[-to:, perm]

    def spacing_error(self, stamps_ns: np.ndarray, episode_start_ns: int | None = None) -> str | None:
        """Why a history with these step stamps is not what the model was trained on (None if it is).

        Steps must lie one control period apart (within a quarter period: steps are the feedback samples
        nearest their grid points), coincide, or start from the episode's first sample (padding at an episode
        start, which a controller ticking faster than the model keeps for one control period). A stack ticking
        faster than the model without ``history_period`` set would otherwise feed it a compressed history,
        silently.
        """
        used = np.asarray(stamps_ns, dtype=np.int64)[-self.meta.n_obs_steps:]
        dt = self.meta.control_dt
        bad = [(b - a) / 1e9 for a, b in itertools.pairwise(used)
               if b != a and a != episode_start_ns and abs((b - a) / 1e9 - dt) > 0.25 * dt]
        if bad:
            return (f"observation history steps are {bad[0] * 1e3:.0f} ms apart, {self.name!r} was trained on "
                    f"{dt * 1e3:.0f} ms (set state_ingest history_period to {dt:g})")
        return None

    def step(self, history: np.ndarray, names: Sequence[str], budget_s: float | None = None,
             image: np.ndarray | None = None, stamps_ns: np.ndarray | None = None,
             episode_start_ns: int | None = None, stamp_ns: int | None = None) -> StepResult:
        """One call: raw history ``(T >= n_obs_steps, D)`` with column ``names`` -> chunk and health.

        ``image`` is the image history a camera policy needs (ignored by state policies); ``stamps_ns``, the
        history's step stamps, are checked against the model's control period when given
        (:meth:`spacing_error`). ``stamp_ns`` (the observation's) keys a fresh noise draw with ``noise_per``
        ``decision``; without it the episode's draw is used.

        ``budget_s`` is the deadline of the call itself: a late observation (a stall upstream) is the
        transport's miss, counted by the node, and no reason to distrust the student.
        """
        t0 = time.perf_counter()
        try:
            obs = self._select(np.asarray(history, dtype=np.float32), names)
        except ValueError as err:
            return StepResult(None, None, 0.0, Health(False, f"observation: {err}", "shape"))
        if self.noise_per == "decision" and stamp_ns is not None:
            self.noise = policy_noise(self.noise.shape, self.seed, self.episode or 0, stamp_ns)
        if stamps_ns is not None and (why := self.spacing_error(stamps_ns, episode_start_ns)):
            return StepResult(None, None, 0.0, Health(False, why, "shape"))
        if self.image_size is not None and image is None:
            return StepResult(None, None, 0.0, Health(False, f"{self.name} needs an image observation", "shape"))
        try:
            if self.image_size is not None:
                chunk = np.asarray(self.model.predict_action(image, obs, noise=self.noise))
            else:
                chunk = np.asarray(self.model.predict_action(obs, noise=self.noise))
        except Exception as err:  # any failure of the student is a fallback reason, never a crash
            dt = time.perf_counter() - t0
            return StepResult(None, None, dt, Health(False, f"{self.name} raised {type(err).__name__}: {err}",
                                                     "exception"))
        dt = time.perf_counter() - t0
        m = self.meta
        ood = self.model.last_ood_score
        ood_f = float(ood) if ood is not None else None
        if chunk.shape != (m.horizon, m.action_dim):
            return StepResult(None, ood_f, dt, Health(False, f"{self.name} returned shape {chunk.shape}, expected "
                                                            f"{(m.horizon, m.action_dim)}", "shape"))
        if not np.isfinite(chunk).all():
            return StepResult(None, ood_f, dt, Health(False, f"{self.name} returned NaN/inf actions", "nonfinite"))
        low = chunk < self.lower
        high = chunk > self.upper
        if low.any() or high.any():
            j = int(np.argwhere(low | high)[0, 1])
            worst = chunk[:, j].min() if low[:, j].any() else chunk[:, j].max()
            return StepResult(None, ood_f, dt, Health(
                False, f"{self.name} action {m.action_names[j]} = {worst:.3f} rad outside "
                       f"[{self.lower[j]:.3f}, {self.upper[j]:.3f}]", "limits"))
        if budget_s is not None and dt > budget_s:
            reason = f"{self.name} missed its deadline ({dt * 1e3:.1f} ms > {budget_s * 1e3:.1f} ms)"
            return StepResult(chunk, ood_f, dt, Health(False, reason, "deadline"))
        if ood_f is not None and not np.isfinite(ood_f):
            return StepResult(chunk, ood_f, dt, Health(False, f"{self.name} OOD score is {ood_f}", "ood"))
        if self.ood_threshold is not None and ood_f is not None and ood_f > self.ood_threshold:
            return StepResult(chunk, ood_f, dt, Health(
                False, f"{self.name} OOD score {ood_f:.3g} > threshold {self.ood_threshold:.3g}", "ood"))
        return StepResult(chunk, ood_f, dt, HEALTHY)
