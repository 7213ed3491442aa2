"""Config fields that give a test policy a built-in task's contract, as trained policies get it from their data:
every export carries the contract of the vectors it reads and writes."""

from __future__ import annotations

import json
from typing import Any

import koopman_sim
from koopman_policy.contract import Contract, ImageSpec, camera_contract


def task_fields(task: str = "gen3_reach_obstacle", image: ImageSpec | None = None) -> dict[str, Any]:
    """``obs_names``, ``action_names`` and ``contract`` of ``task`` (with ``image``: its camera policies')."""
    contract = Contract.from_file(koopman_sim.task_file(task))
    if image is not None:
        contract = camera_contract(contract, image)
    return {"obs_names": list(contract.obs_names), "action_names": list(contract.action_names),
            "contract": json.loads(contract.to_json())}
