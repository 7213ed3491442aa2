"""The stack in one process: the nodes of :func:`koopman_control.stack.build_stack`, instantiated from their
classes with the parameters ``ros2 launch`` would give them, each on its own executor thread.

For pip-only machines (no ``launch``/``ros2`` CLI) and for tests and benchmarks, which read the nodes'
statistics directly instead of scraping /diagnostics.
"""

from __future__ import annotations

import atexit
import contextlib
import time
from collections.abc import Mapping
from typing import Any

import rclpy
from rclpy.context import Context
from rclpy.parameter import Parameter
from rclpy.signals import SignalHandlerOptions

from koopman_control.ros.base import GcMonitor, KoopmanNode, ParameterError, Spinner, settle_heap
from koopman_control.stack import NodeSpec, StackArgs, StackError, build_stack

#: The stack's targets in simulation on the development machine (observation to chunk, the process layout).
TARGETS = {"latency_p50_ms": 1.0, "latency_p99_ms": 2.0, "missed_ticks": 0, "early_collisions": 0}
#: A collision this soon after an episode's start cannot be the policy's own motion (see summarize).
EARLY_COLLISION_S = 0.5


class Stack:
    """Running nodes plus their executors; ``close()`` destroys them and shuts down the context it made."""

    def __init__(self, specs: list[NodeSpec], context: Context | None = None, domain_id: int | None = None) -> None:
        self._own_context = context is None
        if context is None:
            context = Context()
            rclpy.init(context=context, domain_id=domain_id, signal_handler_options=SignalHandlerOptions.NO)
        self.context = context
        self.specs = specs
        self.nodes: dict[str, KoopmanNode] = {}
        self.spinner: Spinner | None = None
        self.gc: GcMonitor | None = None
        self.base_priority = 0  # SCHED_FIFO priority of the stack's non-control threads (0: not real-time)
        # Executor threads are daemons; if the interpreter exits while they are inside rclpy, the process
        # aborts. Closing at exit (before daemon threads are stopped) covers callers that never call close().
        atexit.register(self.close)
        try:
            for spec in specs:
                cls = spec.node_class()
                overrides = [Parameter(k, value=v) for k, v in spec.parameters().items()]
                remaps = [a for src, dst in spec.remappings for a in ("-r", f"{src}:={dst}")]
                self.nodes[spec.name] = cls(node_name=spec.name, context=context, parameter_overrides=overrides,
                                            cli_args=["--ros-args", *remaps] if remaps else None)
            spun = [n for node in self.nodes.values() for n in node.spin_nodes()]
            # The observation -> chunk path (ingest, policy control) on one executor thread: the policy's
            # subscription is served by the thread that just published the observation, with no cross-thread
            # wake-up in between (measured: the hop from ingest to policy was the largest share of the latency).
            path = [n for node in self.nodes.values() for n in node.control_path()]
            # One interpreter, one GIL: a normal-priority thread preempted by another process while it holds
            # the GIL would stall the real-time threads waiting for it, so in-process every executor thread
            # runs in the real-time class (base_priority), below the control threads' own priorities.
            base = min((p for node in self.nodes.values() for p in node.thread_priorities().values()), default=0)
            self.base_priority = max(1, base // 2) if base else 0
            prios = {n.get_name(): self.base_priority for n in spun} if base else {}
            prios.update({k: v for node in self.nodes.values() for k, v in node.thread_priorities().items()})
            settle_heap()
            self.gc = GcMonitor()
            groups: list[Any] = [n for n in spun if n not in path] + ([path] if path else [])
            self.spinner = Spinner(groups, context, prios)
            for node in self.nodes.values():
                node.start()
        except BaseException:
            self.close()
            raise

    @classmethod
    def from_args(cls, args: StackArgs | None = None, overrides: Mapping[str, Mapping[str, Any]] | None = None,
                  context: Context | None = None, domain_id: int | None = None) -> Stack:
        return cls(build_stack(args, overrides=overrides), context=context, domain_id=domain_id)

    def __getitem__(self, name: str) -> Any:
        return self.nodes[name]

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def check(self) -> None:
        """Raise the first error a node's thread hit (executor callbacks, the sim's physics loop)."""
        if self.spinner is not None and self.spinner.errors:
            raise self.spinner.errors[0]
        sim = self.nodes.get("sim")
        if sim is not None and getattr(sim, "loop", None) is not None and sim.loop.error is not None:
            raise RuntimeError(f"sim physics loop stopped: {sim.loop.error!r}") from sim.loop.error
        for node in self.nodes.values():
            if hasattr(node, "check"):
                node.check()  # the Kortex bridge raises here when one of its threads died

    def reset_stats(self) -> None:
        if self.gc is not None:
            self.gc.pauses.reset()
        for node in self.nodes.values():
            node.reset_stats()

    def metrics(self) -> dict[str, Any]:
        """The bench/bringup summary (:func:`summarize`) of every node's metrics."""
        per_node = {name: node.metrics() for name, node in self.nodes.items()}
        return {**summarize(per_node), "gc_pauses_ms": self.gc.pauses.summary() if self.gc is not None else None}

    def close(self) -> None:
        atexit.unregister(self.close)
        if self.gc is not None:
            self.gc.close()
        if self.spinner is not None:
            self.spinner.shutdown()
            self.spinner = None
        for node in reversed(list(self.nodes.values())):
            # Keep closing the others if one fails; the context shutdown below cleans up the rest.
            with contextlib.suppress(Exception):
                node.close()
        self.nodes.clear()
        if self._own_context and self.context.ok():
            rclpy.shutdown(context=self.context)


def summarize(per_node: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Episodes, success, latency, missed ticks, fallbacks and feedback rate from the nodes' metrics, however
    they were read (in-process, or over each node's ``~/metrics`` service in the process layout).

    ``episode_list`` has every episode: seed, success, collision, the collision's time after the episode's
    clock started, side, and how long it waited for its first chunk; ``early_collisions`` counts collisions
    within 0.5 s of a start, which no policy can reach in that time: only a command crossing a reset can.
    """
    pol = per_node.get("policy", {})
    sim = per_node.get("sim") or per_node.get("kortex_bridge", {})  # the arm, simulated or through Kortex
    lat = pol.get("latency_ms", {})
    episodes = sim.get("episode_list") or []
    return {
        "episodes": sim.get("episodes"),
        "success_rate": sim.get("success_rate"),
        "successes": sim.get("successes"),
        "mean_max_coverage": sim.get("mean_max_coverage"),
        "collisions": sim.get("collisions"),
        "early_collisions": sum(1 for e in episodes if e.get("collision_after_start_s") is not None
                                and e["collision_after_start_s"] < EARLY_COLLISION_S),
        "policy": pol.get("policy"),
        "mode": pol.get("mode"),
        "latency_ms": {k: lat.get(k) for k in ("p50", "p99", "max", "mean", "count")},
        "missed_ticks": pol.get("missed_ticks"),
        "deadline_misses": pol.get("deadline_misses"),
        "fallback_events": pol.get("fallback_events"),
        "holds": pol.get("holds"),
        "control_rate_hz": (pol.get("tick_rate") or {}).get("rate_hz"),
        "feedback": sim.get("feedback"),
        "episode_list": episodes,
        "nodes": per_node,
    }


def meets_targets(m: dict[str, Any]) -> dict[str, bool | None]:
    lat = m.get("latency_ms", {})
    return {
        "latency_p50_ms": None if lat.get("p50") is None else lat["p50"] <= TARGETS["latency_p50_ms"],
        "latency_p99_ms": None if lat.get("p99") is None else lat["p99"] <= TARGETS["latency_p99_ms"],
        "missed_ticks": None if m.get("missed_ticks") is None else m["missed_ticks"] <= TARGETS["missed_ticks"],
        "early_collisions": None if m.get("early_collisions") is None
        else m["early_collisions"] <= TARGETS["early_collisions"],
    }


def run_for(stack: Stack, duration: float, warmup: float = 0.0, on_tick: Any = None, poll: float = 0.5) -> None:
    """Run ``duration`` seconds after a ``warmup`` whose statistics are discarded."""
    if warmup > 0:
        t_end = time.monotonic() + warmup
        while time.monotonic() < t_end:
            time.sleep(min(poll, max(0.0, t_end - time.monotonic())))
            stack.check()
        stack.reset_stats()
    t_end = time.monotonic() + duration
    while time.monotonic() < t_end:
        time.sleep(min(poll, max(0.0, t_end - time.monotonic())))
        stack.check()
        if on_tick is not None:
            on_tick(stack)


__all__ = ["TARGETS", "ParameterError", "Stack", "StackArgs", "StackError", "meets_targets", "run_for", "summarize"]
