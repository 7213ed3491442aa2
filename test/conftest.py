"""Shared fixtures of the ROS tests: contexts on the session's own DDS domain, the test's own participant (it
records topics, publishes and calls services, as a user's ``ros2`` CLI or another process would), and nodes or
stacks that are always torn down in the right order.

Everything here is real rclpy over real DDS; waits are on the event a test expects (:func:`wait_until`), never
fixed sleeps.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import rclpy
from rclpy.context import Context
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node

from koopman_control.testing import ros_context, wait_until

__all__ = ["CollectedProcess", "Participant", "wait_until"]


class CollectedProcess:
    """A command in its own session on a ROS domain of its own (localhost discovery), its stdout and stderr
    collected line by line as it runs."""

    def __init__(self, argv: list[str], domain: int, **env: str) -> None:
        full_env = {**os.environ, "ROS_DOMAIN_ID": str(domain), "ROS_AUTOMATIC_DISCOVERY_RANGE": "LOCALHOST",
                    "PYTHONUNBUFFERED": "1", **env}
        self.proc = subprocess.Popen(argv, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, start_new_session=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)


class Participant:
    """The test's own DDS participant on its own executor thread."""

    def __init__(self, ctx: Context, name: str = "test_probe") -> None:
        self.node = Node(name, context=ctx)
        self.topics: dict[str, list[tuple[int, Any]]] = {}
        self._ex = SingleThreadedExecutor(context=ctx)
        self._ex.add_node(self.node)
        self._thread = threading.Thread(target=self._ex.spin, name=f"spin-{name}", daemon=True)
        self._thread.start()

    def record(self, topic: str, msg_type: type, qos: Any) -> list[tuple[int, Any]]:
        """Every message on ``topic`` from now on, as (receive time ns, message)."""
        got: list[tuple[int, Any]] = self.topics.setdefault(topic, [])
        self.node.create_subscription(msg_type, topic, lambda m: got.append((time.time_ns(), m)), qos)
        return got

    def messages(self, topic: str) -> list[Any]:
        return [m for _, m in self.topics.get(topic, [])]

    def publisher(self, topic: str, msg_type: type, qos: Any) -> Any:
        return self.node.create_publisher(msg_type, topic, qos)

    def call(self, srv_type: type, name: str, request: Any, timeout: float = 30.0) -> Any:
        """Call a service and wait for its answer (like ``ros2 service call``)."""
        client = self.node.create_client(srv_type, name)
        assert client.wait_for_service(timeout_sec=min(timeout, 15.0)), f"service {name} not available"
        fut = client.call_async(request)
        return wait_until(lambda: fut.done() and fut.result(), timeout, what=f"the answer of {name}")

    def wait_for(self, topic: str, predicate: Callable[[Any], bool], timeout: float, what: str,
                 after: int = 0) -> Any:
        """The first message on ``topic`` (index >= ``after``) that satisfies ``predicate``."""
        def find() -> Any:
            msgs = self.topics.get(topic, [])
            return next((m for _, m in msgs[after:] if predicate(m)), None)

        return wait_until(find, timeout, what=what)

    def demonstrate_with_expert(self) -> None:
        """Answer every observation on policy/observation with the scripted expert's plan on
        policy/action_chunk, as a teleoperator or another controller would (one expert plan per episode)."""
        import numpy as np
        from trajectory_msgs.msg import JointTrajectory

        from koopman_control import topics
        from koopman_control.core.episodes import parse_episode
        from koopman_control.ros import convert, qos
        from koopman_sim import gen3
        from koopman_sim.expert import ScriptedExpert

        expert, state = ScriptedExpert(), {"episode": None, "k": 0}
        pub = self.publisher(topics.ACTION_CHUNK, JointTrajectory, qos.CONTROL)

        def on_obs(msg: JointTrajectory) -> None:
            if not msg.points:
                return
            stamp, hist, _, _ = convert.observation_from_msg(msg)
            ep = parse_episode(msg.header.frame_id)
            if ep != state["episode"]:
                state["episode"], state["k"] = ep, 0
                expert.reset(hist[-1], np.random.default_rng(ep))
            k = min(state["k"], expert.plan_steps - 1)
            plan = expert.plan[k:k + 16]
            pub.publish(convert.chunk_msg(stamp, list(gen3.JOINT_NAMES), np.arange(len(plan)) * 0.1, plan,
                                          msg.header.frame_id))
            state["k"] += 1

        self.node.create_subscription(JointTrajectory, topics.OBSERVATION, on_obs, qos.CONTROL)

    def close(self) -> None:
        self._ex.shutdown()
        self._thread.join(2.0)
        self.node.destroy_node()


@contextmanager
def _made_contexts() -> Iterator[Callable[..., Context]]:
    made: list[Context] = []

    def make(domain_id: int | None = None) -> Context:
        ctx = ros_context(domain_id)
        made.append(ctx)
        return ctx

    yield make
    for ctx in made:
        if ctx.ok():
            rclpy.shutdown(context=ctx)


@contextmanager
def _made_participants(contexts: Callable[..., Context]) -> Iterator[Callable[..., Participant]]:
    made: list[Participant] = []

    def make(name: str = "test_probe", domain_id: int | None = None) -> Participant:
        p = Participant(contexts(domain_id), name)
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()


@contextmanager
def _made_nodes(contexts: Callable[..., Context]) -> Iterator[Callable[..., Any]]:
    from rclpy.parameter import Parameter

    from koopman_control.ros.base import Spinner

    made: list[tuple[Any, Spinner]] = []

    def make(cls: type, domain_id: int | None = None, **params: Any) -> Any:
        ctx = contexts(domain_id)
        node = cls(context=ctx, parameter_overrides=[Parameter(k, value=v) for k, v in params.items()])
        spin = Spinner(node.spin_nodes(), ctx)
        made.append((node, spin))
        node.start()
        return node

    yield make
    for node, spin in reversed(made):
        spin.shutdown()
        node.close()


@pytest.fixture
def contexts() -> Iterator[Callable[..., Context]]:
    """Make rclpy contexts on the session's domain (or another); all are shut down at the end."""
    with _made_contexts() as make:
        yield make


@pytest.fixture
def participant(contexts: Callable[..., Context]) -> Iterator[Callable[..., Participant]]:
    """Make test participants (each with a context of its own); closed before their contexts."""
    with _made_participants(contexts) as make:
        yield make


@pytest.fixture
def running_node(contexts: Callable[..., Context]) -> Iterator[Callable[..., Any]]:
    """Start one node class on its own context and executor threads (as its executable would); closed at the
    end. ``make(NodeClass, **parameters)``."""
    with _made_nodes(contexts) as make:
        yield make


# The same for a module-scoped fixture: one rig (a robot, a stack) that a module's tests share because starting
# it costs seconds. Torn down when the module's last test has run.
@pytest.fixture(scope="module")
def module_contexts() -> Iterator[Callable[..., Context]]:
    """:func:`contexts` for the whole module."""
    with _made_contexts() as make:
        yield make


@pytest.fixture(scope="module")
def module_participant(module_contexts: Callable[..., Context]) -> Iterator[Callable[..., Participant]]:
    """:func:`participant` for the whole module."""
    with _made_participants(module_contexts) as make:
        yield make


@pytest.fixture(scope="module")
def module_running_node(module_contexts: Callable[..., Context]) -> Iterator[Callable[..., Any]]:
    """:func:`running_node` for the whole module."""
    with _made_nodes(module_contexts) as make:
        yield make
