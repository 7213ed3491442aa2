"""ROS 2 parameter files read without ROS, so the in-process bringup applies the very files that
``ros2 launch`` passes to the nodes, with the same precedence (wildcard sections, then the node's own)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml


class ParameterFileError(ValueError):
    """A parameter file that is not in ROS 2 ``<node>: ros__parameters: {...}`` format."""


def _flatten(prefix: str, data: Mapping[str, Any], out: dict[str, Any]) -> None:
    for key, value in data.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            _flatten(name, value, out)
        else:
            out[name] = value


def load_parameters(path: str | Path, node_name: str, namespace: str = "/") -> dict[str, Any]:
    """Parameters for ``node_name`` from a ROS 2 parameter file (nested keys joined with dots)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ParameterFileError(f"{path}: cannot read: {err}") from None
    if not isinstance(data, Mapping):
        raise ParameterFileError(f"{path}: expected a mapping of node names")
    ns = namespace.rstrip("/")
    keys = ["/**", "**", node_name, f"/{node_name}", f"{ns}/{node_name}"]
    out: dict[str, Any] = {}
    for key in dict.fromkeys(keys):
        section = data.get(key)
        if section is None:
            continue
        if not isinstance(section, Mapping) or "ros__parameters" not in section:
            raise ParameterFileError(f"{path}: section {key!r} needs a 'ros__parameters:' mapping")
        params = section["ros__parameters"] or {}
        if not isinstance(params, Mapping):
            raise ParameterFileError(f"{path}: {key}.ros__parameters must be a mapping")
        _flatten("", params, out)
    return out
