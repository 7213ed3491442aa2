"""The observation and action contract of a dataset or a checkpoint (:mod:`koopman_policy.contract`).

Recorded ones come first: ``koopman-sim collect`` writes the task's contract into the dataset, the training
commands carry it into the policy's ``config.contract``. Data and checkpoints made before contracts existed (every
shipped model) get their built-in task's, ``koopman_sim.task_file(task)``: the task whose contract describes
exactly the model's observation and action names and rate. A camera policy's is the task's joint features plus
an image feature of its camera, frame size and normalisation (``camera_contract``).
"""

from __future__ import annotations

import json
from typing import Any

import koopman_sim
from koopman_policy.contract import CAMERA_TOPIC, Contract, ContractError, ImageSpec, camera_contract, consistent
from koopman_sim.dataset import DemoDataset


def as_config(contract: Contract) -> dict[str, Any]:
    """The contract as a policy config stores it (``config.contract``): plain JSON values, so that a config
    read back from ``config.json`` equals the one saved."""
    return json.loads(contract.to_json())


def task_contract(task: str) -> Contract:
    """The built-in task's contract (its task file)."""
    return Contract.from_file(koopman_sim.task_file(task))


def dataset_contract(demos: DemoDataset) -> Contract:
    """The contract the dataset records, checked against its names and rate; the task's for older datasets."""
    if demos.contract is not None:
        contract = Contract.from_json(demos.contract, f"dataset {demos.path}: contract")
    elif demos.images is not None:
        raise ContractError(f"dataset {demos.path} has frames but no contract naming their camera; collect it again "
                            "with koopman-sim collect --camera NAME")
    else:
        contract = task_contract(demos.task)
    consistent(contract, demos.obs_names, demos.action_names, demos.control_dt)
    return contract


def checkpoint_contract(method: str, config: dict[str, Any]) -> Contract:
    """The contract of a checkpoint with this method and config (``config.json``'s): the one it records, else
    the one built-in task whose contract matches its names and rate."""
    if config.get("contract") is not None:
        return Contract.from_dict(config["contract"], f"{method} config.contract")
    camera = "image_height" in config  # koopman_policy.vision.VisionFields
    for task in koopman_sim.TASKS:
        contract = task_contract(task)
        if camera:
            image = ImageSpec(int(config["image_height"]), int(config["image_width"]), str(config["camera"]))
            try:
                contract = camera_contract(contract, image, CAMERA_TOPIC)
            except ContractError:
                continue
        try:
            consistent(contract, config.get("obs_names", []), config.get("action_names", []),
                       float(config["control_dt"]))
        except ContractError:
            continue
        return contract
    raise ContractError(f"{method}: the config records no contract, and its observation names "
                        f"{config.get('obs_names')} and action names {config.get('action_names')} at "
                        f"{config.get('control_dt')} s are no built-in task's ({', '.join(koopman_sim.TASKS)})")
