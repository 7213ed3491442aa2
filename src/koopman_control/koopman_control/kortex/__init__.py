"""Kinova Gen3 through Kinova's Kortex API: client, bridge core, limits, units and the MuJoCo stand-in.

``kortex_api`` is imported only when ``backend: kortex`` is used (:mod:`koopman_control.kortex.api`), so the
stack installs and tests without Kinova's wheel. :func:`bridge_spec` is what the stack description
(:mod:`koopman_control.stack`) needs to start ``kortex_bridge_node`` for a real arm or the stand-in.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

KINOVA_FILE = "kinova.yaml"
#: The arm's command checks (koopman_control.core.chunk.CommandChecks), which the sim node takes from
#: config/kinova.yaml too: what runs in simulation is what the arm would accept.
COMMAND_CHECK_KEYS = ("watchdog_timeout", "max_start_deviation", "max_chunk_age", "position_lower",
                      "position_upper")
ROBOTS = ("sim", "kortex", "kortex-standin")
STANDIN_IP = "192.168.1.10"


def command_checks(root: str | Path) -> dict[str, Any]:
    """The arm's command-check parameters from ``config/kinova.yaml`` (those it sets)."""
    from koopman_control.params import load_parameters

    cfg = Path(root) / "config" / KINOVA_FILE
    if not cfg.is_file():
        raise FileNotFoundError(f"{cfg} not found (the real robot's limits and rates)")
    params = load_parameters(cfg, "kortex_bridge")
    return {k: params[k] for k in COMMAND_CHECK_KEYS if k in params}


def bridge_spec(robot: str, root: str | Path, robot_ip: str | None = None) -> tuple[tuple[Path, ...], dict[str, Any]]:
    """Parameter files (after ``config/stack.yaml``) and overrides of ``kortex_bridge`` for ``robot``.

    ``kortex``: the real arm at ``robot_ip`` with ``config/kinova.yaml``. ``kortex-standin``: the same file and
    code path against the in-process stand-in, which also provides the task scene (target, pillar, scoring).
    """
    if robot not in ROBOTS[1:]:
        raise ValueError(f"robot must be one of {', '.join(ROBOTS[1:])} for the bridge, got {robot!r}")
    cfg = Path(root) / "config" / KINOVA_FILE
    if not cfg.is_file():
        raise FileNotFoundError(f"{cfg} not found (the real robot's limits and rates)")
    overrides: dict[str, Any] = {}
    if robot_ip:
        overrides["robot_ip"] = robot_ip
    if robot == "kortex-standin":
        overrides.update(backend="standin", task_source="standin")
        overrides.setdefault("robot_ip", STANDIN_IP)
    return (cfg,), overrides
