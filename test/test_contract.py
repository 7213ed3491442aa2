"""Bad contracts and sources a contract cannot be served from: each is a clear error naming the feature and
its source, and the ingest builds no observation from it (so the policy sends nothing and the arm holds).

The swap to a model whose contract the running sources cannot serve is refused in ``test_ros_policy`` and in
the fault run (``other-task-model``); a chunk for the wrong joints is refused by the arm's command checks.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from koopman_control.contracts import resolve_contract
from koopman_control.core.observation import InputStatus, StateObservationBuilder
from koopman_policy.contract import Contract, ContractError

JOINTS = [f"joint_{i}" for i in range(1, 8)]
MS = 1_000_000


def task(**extra_target: object) -> dict:
    target = {"name": "target", "kind": "vector", "topic": "task/target", "type": "geometry_msgs/msg/PointStamped",
              "fields": ["point.x", "point.y", "point.z"], "names": ["target_x", "target_y", "target_z"],
              "scope": "episode", **extra_target}
    return {"task": "reach_target", "control_dt": 0.1,
            "observation": [{"name": "q", "kind": "joint_position", "joints": JOINTS}, target],
            "action": [{"name": "targets", "kind": "joint_position", "joints": JOINTS}]}


@pytest.mark.parametrize(("change", "message"), [
    ({"colour": "red"}, r"feature 'target'.*unknown keys \['colour'\]"),
    ({"type": "geometry_msgs/msg/Nope"}, r"feature 'target'.*type 'geometry_msgs/msg/Nope' is not one a vector"),
    ({"fields": ["point.x", "point.y", "point w"]}, r"feature 'target'.*field 'point w' is not a message field"),
    ({"value": [0.5, 0.0, 0.2]}, r"feature 'target'.*give a topic or a value, not both"),
    ({"kind": "smell"}, r"feature 'target'.*kind must be one of"),
])
def test_task_file_errors_name_the_feature(tmp_path: Path, change: dict, message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(task(**change)))
    with pytest.raises(ContractError, match=message):
        resolve_contract(str(path))


def test_task_file_unknown_top_level_keys_and_missing_files() -> None:
    with pytest.raises(ContractError, match=r"unknown keys \['gripper'\]"):
        Contract.from_dict({**task(), "gripper": True}, "my task")
    with pytest.raises(ContractError, match="does not exist"):
        resolve_contract("tasks/nowhere.yaml")
    with pytest.raises(ContractError, match="unknown task 'no_such_task'"):
        resolve_contract("no_such_task")


def _builder() -> StateObservationBuilder:
    return StateObservationBuilder(Contract.from_dict(task(), "reach_target").observation, n_obs_steps=2,
                                   policy_rate_hz=10.0)


def test_a_topic_nobody_publishes_keeps_the_ingest_waiting_and_says_which() -> None:
    b = _builder()
    for k in range(30):  # 3 s of joint states, no target ever
        assert b.on_joint_state(JOINTS, np.zeros(7), np.zeros(7), k * 100 * MS, k * 100 * MS) is None
    b.check(29 * 100 * MS + MS)
    assert b.status is InputStatus.WAITING
    assert "target" in b.reason and "task/target" in b.reason, b.reason


def test_joints_missing_from_joint_states_are_named() -> None:
    b = _builder()
    b.set_vector("target", 0, [0.5, 0.0, 0.2])
    assert b.on_joint_state(JOINTS[:5], np.zeros(5), np.zeros(5), 100 * MS, 100 * MS) is None
    assert b.status is InputStatus.INVALID
    assert "joint_6" in b.reason and "joint_7" in b.reason, b.reason


def test_record_task_file_adds_the_contracts_topics(tmp_path: Path) -> None:
    """``koopman-control record --task-file``: every topic the contract reads, as the bag names it."""
    from koopman_control.bag.cli import task_topics

    path = tmp_path / "reach_target.yaml"
    path.write_text(yaml.safe_dump(task()))
    assert task_topics(str(path)) == ["/joint_states", "/policy/action_chunk", "/task/episode",
                                      "/task/episode_result", "/task/target"]
    assert "/task/block_pose" in task_topics("pusht")
