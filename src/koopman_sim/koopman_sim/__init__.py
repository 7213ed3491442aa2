"""koopman_sim: MuJoCo Kinova Gen3 arm, the ``gen3_reach_obstacle`` and ``pusht`` tasks, scripted experts, dataset I/O.

``make(name, **kw)`` builds a registered Gymnasium environment; ``TASKS`` lists the registered names.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

# Offscreen rendering on a headless machine needs EGL, and MuJoCo reads MUJOCO_GL once, at import time:
# default it here (before koopman_sim imports mujoco) unless the user chose a backend or has a display.
if not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
    os.environ.setdefault("MUJOCO_GL", "egl")

__all__ = ["TASKS", "UnknownTaskError", "make"]


class UnknownTaskError(ValueError):
    """Raised by ``make`` for a task name that is not registered; the message lists the known names."""


def _make_reach_obstacle(**kw: Any) -> Any:
    from koopman_sim.tasks.reach_obstacle import Gen3ReachObstacleEnv

    return Gen3ReachObstacleEnv(**kw)


def _make_pusht(**kw: Any) -> Any:
    from koopman_sim.tasks.pusht import PushTEnv

    return PushTEnv(**kw)


_REGISTRY: dict[str, Callable[..., Any]] = {"gen3_reach_obstacle": _make_reach_obstacle, "pusht": _make_pusht}
TASKS: tuple[str, ...] = tuple(_REGISTRY)


def check_task(task_name: str) -> str:
    """Return ``task_name`` if registered, else raise UnknownTaskError naming the known tasks."""
    if task_name not in _REGISTRY:
        raise UnknownTaskError(f"unknown task {task_name!r}; known tasks: {', '.join(TASKS)}")
    return task_name


def task_file(task_name: str) -> Any:
    """The built-in task's contract file (``tasks/<name>.yaml``: observation and action features and their
    sources; read with ``koopman_policy.contract.Contract.from_file``)."""
    from importlib import resources

    return resources.files("koopman_sim") / "tasks" / f"{check_task(task_name)}.yaml"


def make(task_name: str, **kw: Any) -> Any:
    """Create the Gymnasium environment registered as ``task_name``; keywords go to its constructor."""
    return _REGISTRY[check_task(task_name)](**kw)
