"""A task of the user's own, end to end at small scale: a task file names what the policy observes (the arm's
joints and the target, no pillar) and commands; a run demonstrated through the topics by the scripted expert is
recorded with ``koopman-control record``'s recorder, turned into a dataset by ``bag-to-dataset --task-file``,
a teacher and a student are trained and exported by the pipeline's own commands, and the stack serves the
exported student from its directory: the contract it carries is the task file's, and the stack builds exactly
that observation from the recorded topics.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import wait_until
from std_msgs.msg import String

from koopman_control import topics
from koopman_control.ros import qos

pytestmark = pytest.mark.slow
JOINTS = [f"joint_{i}" for i in range(1, 8)]
_J = ", ".join(JOINTS)
TASK_FILE = f"""
task: reach_target
control_dt: 0.1
description: reach the target (the pillar is in the cell, but this policy does not observe it)
observation:
  - {{name: joint_positions, kind: joint_position, joints: [{_J}]}}
  - {{name: joint_velocities, kind: joint_velocity, joints: [{_J}]}}
  - name: target
    kind: vector
    topic: task/target
    type: geometry_msgs/msg/PointStamped
    fields: [point.x, point.y, point.z]
    names: [target_x, target_y, target_z]
    scope: episode
action:
  - {{name: joint_targets, kind: joint_position, joints: [{_J}]}}
"""


def test_record_convert_train_export_and_serve_a_task_of_your_own(tmp_path: Path, contexts, participant) -> None:
    from koopman_control.bag.recorder import BagRecorder
    from koopman_control.bringup import Stack
    from koopman_control.contracts import policy_contract, resolve_contract
    from koopman_control.stack import StackArgs, build_stack
    from koopman_control.testing import session_domain_id
    from koopman_distill.cli import main as distill

    task_file = tmp_path / "reach_target.yaml"
    task_file.write_text(TASK_FILE)
    task = resolve_contract(str(task_file))

    # 1. Demonstrations through the topics: the sim and the ingest run; the scripted expert answers every
    #    observation with its plan on policy/action_chunk, as a teleoperator or another controller would.
    domain = session_domain_id(130)
    p = participant("demonstrator", domain)
    results = p.record(topics.EPISODE_RESULT, String, qos.EVENTS)
    p.demonstrate_with_expert()
    specs = [s for s in build_stack(StackArgs(task="gen3_reach_obstacle"), overrides={"sim": {"seed": 31}})
             if s.name in ("sim", "state_ingest")]
    bag = tmp_path / "demos_bag"
    ctx = contexts(domain)
    with Stack(specs, context=ctx):
        recorder = BagRecorder(bag, context=ctx)
        recorder.start()
        try:
            wait_until(lambda: len(results) >= 4, 60.0, interval=0.2, what="four demonstrated episodes")
        finally:
            recorder.stop()

    # 2. The recording as a dataset of this task, then the pipeline's own commands.
    demos = tmp_path / "demos.h5"
    assert distill(["bag-to-dataset", str(bag), "--task-file", str(task_file), "--out", str(demos)]) == 0
    assert distill(["teacher", "--data", str(demos), "--out", str(tmp_path / "teacher"), "--steps", "30",
                    "--batch-size", "32", "--set", "down_dims=16,32", "--set", "step_embed_dim=16"]) == 0
    assert distill(["teacher-data", "--teacher", str(tmp_path / "teacher"), "--data", str(demos), "--out",
                    str(tmp_path / "td.h5"), "--steps", "3", "--draws", "1"]) == 0
    student = tmp_path / "student"
    assert distill(["student", "--method", "dkoopman", "--teacher", str(tmp_path / "teacher"), "--teacher-data",
                    str(tmp_path / "td.h5"), "--out", str(student), "--steps", "20", "--batch-size", "16",
                    "--set", "hidden_dim=32", "--set", "cond_embed_dim=8"]) == 0
    assert distill(["export", "--checkpoint", str(student)]) == 0
    exported = policy_contract(str(student))
    assert exported.task == "reach_target" and exported.obs_names == task.obs_names  # 17 values, no pillar
    card = json.loads((student / "card.json").read_text())
    assert card["contract"]["task"] == "reach_target"

    # 3. Served from its directory: the stack takes the contract from the export and the ingest builds it.
    served = build_stack(StackArgs(policy=str(student), teacher_fallback=False))
    ingest = next(s for s in served if s.name == "state_ingest")
    assert resolve_contract(ingest.overrides["contract"]).obs_names == task.obs_names
    with Stack(served, context=contexts(domain + 1)) as stack:
        pol = stack["policy"]
        assert pol.runner is not None and pol.runner.name == "student", pol.load_error
        wait_until(lambda: pol.stats.published >= 20, 30.0, what="chunks from the served student")
        assert stack["state_ingest"].obs_names == list(task.obs_names)
        # Trained for seconds, the student is no controller yet: its chunks reach the arm, which takes each or
        # refuses it by its command checks (a chunk starting far from the arm), never for its form.
        judged = wait_until(lambda: (c := stack["sim"].driver.summary()["commands"])["accepted"] + c["rejected"] > 10
                            and c, 10.0, what="the arm to judge the student's chunks")
        assert not set(judged["refused_by_cause"]) & {"bad shape", "non-finite", "bad timing"}, judged
