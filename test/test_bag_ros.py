"""Recording and playing bags with real rclpy nodes over DDS (each test on its own ROS domain).

* the recorder records the live in-process stack; its bag carries the runtime's type hashes and offline replay
  of the driving policy reproduces the live commands;
* ``koopman-control record`` as a process, stopped with Ctrl-C (SIGINT), leaves a closed, readable bag;
* ``replay-live`` plays a bag into the stack in place of the sim and records the live run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import wait_until

from koopman_control.bag import topics as T
from koopman_control.bag.reader import inspect_bag, load_run
from koopman_control.bag.replay import replay
from koopman_control.bag.simrun import record_sim_run
from koopman_control.contracts import resolve_contract

# The offline replay compares each recorded observation's chunk with the policy's answer to it, so the
# recorded stack plans on every tick (as `replay-live` does) instead of following plans.
OVERRIDES = {"sim": {"feedback_rate": 100.0, "realtime_priority": 0},
             "state_ingest": {"realtime_priority": 0},
             "policy": {"execute_steps": 1}}


def domain() -> int:
    return random.randint(20, 99)  # 0..101 are safe on Linux (higher ids collide with ephemeral ports)


def check_with_reference_mcap_reader(bag: Path, meta: dict) -> None:
    """Foxglove's MCAP reader and ROS 2 decoder (the library family rosbag2's MCAP plugin builds on, not the one
    that wrote the bag) read every message, decode it from CDR with the schemas stored in the file, and count as
    many per topic as metadata.yaml says."""
    from collections import Counter

    from mcap.reader import make_reader
    from mcap_ros2.decoder import DecoderFactory

    (mcap_file,) = bag.glob("*.mcap")
    counts: Counter[str] = Counter()
    first_js = None
    with mcap_file.open("rb") as f:
        reader = make_reader(f, decoder_factories=[DecoderFactory()])
        assert reader.get_header().profile == "ros2"
        summary = reader.get_summary()
        assert {s.encoding for s in summary.schemas.values()} == {"ros2msg"}
        assert all(c.message_encoding == "cdr" and "offered_qos_profiles" in c.metadata
                   for c in summary.channels.values())
        for _schema, channel, _msg, decoded in reader.iter_decoded_messages():
            counts[channel.topic] += 1
            if channel.topic == T.JOINT_STATES and first_js is None:
                first_js = decoded
    assert counts == {t["topic_metadata"]["name"]: t["message_count"] for t in meta["topics_with_message_count"]
                      if t["message_count"]}
    run = load_run(bag)
    assert list(first_js.name) == list(run.joint_names)
    assert np.allclose(first_js.position, run.q[0]) and np.allclose(first_js.velocity, run.qd[0])


@pytest.fixture(scope="module")
def bc_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    from koopman_control.testing import export_untrained

    return str(export_untrained("bc", tmp_path_factory.mktemp("models") / "bc.onnx"))


def test_record_live_stack_and_replay_it(tmp_path: Path, bc_model: str, contexts) -> None:
    from koopman_control.bag.recorder import BagRecorder
    from koopman_control.bringup import Stack
    from koopman_control.stack import StackArgs, build_stack

    ctx = contexts(domain())
    bag = tmp_path / "live"
    specs = build_stack(StackArgs(policy=bc_model, teacher_fallback=False), overrides=OVERRIDES)
    rec = BagRecorder(bag, context=ctx, log=lambda _m: None).start()
    with Stack(specs, context=ctx) as stack:
        counts = rec.sink.counts  # what four seconds of the stack give: 100 Hz joint states, 10 Hz chunks
        wait_until(lambda: counts.get(T.JOINT_STATES, 0) >= 400 and counts.get(T.ACTION_CHUNK, 0) >= 40, 30.0,
                   what="400 joint states and 40 chunks recorded")
        stack.check()
        hashes = {t: i[0].topic_type_hash for t in (T.JOINT_STATES, T.ACTION_CHUNK)
                  if (i := rec.node.get_publishers_info_by_topic(t))}
        ingest = stack.nodes["state_ingest"].metrics()
    summary = rec.stop()
    assert summary["topics"][T.JOINT_STATES] > 250 and summary["topics"][T.ACTION_CHUNK] > 25
    info = inspect_bag(bag)
    # The definitions written (kilted typestore) hash like the running rclpy types: `ros2 bag` accepts them.
    import yaml

    meta = yaml.safe_load((bag / "metadata.yaml").read_text())["rosbag2_bagfile_information"]
    written = {t["topic_metadata"]["name"]: t["topic_metadata"]["type_description_hash"]
               for t in meta["topics_with_message_count"]}
    for topic, h in hashes.items():
        assert written[topic] == str(h), topic
    assert meta["storage_identifier"] == "mcap" and meta["version"] == 9
    check_with_reference_mcap_reader(bag, meta)
    latched = info.topics[T.TARGET].qos[0]
    assert latched["durability"] == "transient_local"

    run = load_run(bag)
    res = replay(run, [bc_model], teacher="none")
    s = res.summary
    oc = s["observation_check"]
    assert oc["source"] == "recorded" and s["ticks"] == oc["recorded_count"]
    # Over the span the recorder saw observations, the rebuild from /joint_states ticks when the live ingest
    # did (its grid anchored on recorded ticks, per episode) and rebuilds the same histories.
    if ingest["faults"] == 0 and ingest["history_gaps"] == 0:
        assert abs(oc["rebuilt_in_span"] - oc["recorded_count"]) <= 2, oc
        assert oc["matched"] >= oc["recorded_count"] - 2 and oc["identical"] >= 0.8 * oc["matched"], oc
    err = s["policies"]["bc"]["error_vs_recorded"]
    assert err["matched"] >= 0.9 * s["recorded"]["chunks"]
    assert err["rmse"] < 1e-5  # the live policy node's chunks, reproduced offline


def test_record_command_closes_bag_on_sigint(tmp_path: Path, participant) -> None:
    from sensor_msgs.msg import JointState

    from koopman_control.core.realtime import PeriodicLoop
    from koopman_control.ros import convert, qos
    from koopman_sim.gen3 import JOINT_NAMES

    dom = domain()
    bag = tmp_path / "cli"
    pub = participant("publisher", domain_id=dom).publisher(T.JOINT_STATES, JointState, qos.SENSOR_PUB)
    env = {**os.environ, "ROS_DOMAIN_ID": str(dom)}
    proc = subprocess.Popen([sys.executable, "-m", "koopman_control.bag.cli", "record", "--out", str(bag),
                             "--storage", "sqlite3", "--topics", T.JOINT_STATES], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        try:
            wait_until(lambda: pub.get_subscription_count() == 1, 30.0, what="the record process to subscribe")
        except TimeoutError:
            proc.send_signal(signal.SIGINT)
            raise AssertionError(f"the record process never subscribed: {proc.communicate(timeout=20)}") from None
        sent = 0

        def sensor(_skipped: int) -> None:  # a 100 Hz joint-state stream, as an arm driver publishes it
            nonlocal sent
            if sent < 200:
                pub.publish(convert.joint_state(time.time_ns(), JOINT_NAMES, np.zeros(7), np.zeros(7)))
                sent += 1

        loop = PeriodicLoop(100.0, sensor, name="test-joint-states")
        loop.start()
        try:
            wait_until(lambda: sent == 200, 30.0, what="200 joint states published")
        finally:
            loop.stop()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0 and sent == 200, err
    assert "wrote" in out
    task = resolve_contract("")
    joints_only = dataclasses.replace(task, observation=tuple(f for f in task.observation if f.joints))
    run = load_run(bag, joints_only)  # a bag of joint states alone
    assert inspect_bag(bag).storage == "sqlite3"
    assert len(run.js_stamp_ns) >= 0.95 * sent  # reliable subscription: (nearly) everything after discovery


def test_replay_live_plays_bag_into_stack(tmp_path: Path, bc_model: str, capsys) -> None:
    from koopman_control.bag.cli import main as bag_main

    src = tmp_path / "src"
    record_sim_run(src, driver="expert", duration_s=3.0, feedback_rate_hz=100.0)
    live, summary_json = tmp_path / "live", tmp_path / "live.json"
    code = bag_main(["replay-live", str(src), "--policy", bc_model, "--no-teacher-fallback", "--record", str(live),
                     "--domain-id", str(domain()), "--timeout", "60", "--json", str(summary_json)])
    captured = capsys.readouterr()
    out = captured.out
    assert code == 0, out + captured.err[-3000:]
    assert f"wrote {summary_json}" in out
    summary = json.loads(summary_json.read_text())
    pl = summary["player"]
    assert pl["state"] == "done" and pl["published"] == pl["messages"]
    assert pl["wall_s"] == pytest.approx(pl["bag_duration_s"], abs=0.5)  # recorded timing at rate 1
    assert summary["stack"]["missed_ticks"] <= 2
    run = load_run(live)
    assert len(run.js_stamp_ns) >= 280 and len(run.chunks) >= 25
    # Stamps were moved onto the playback clock: fresh, and spaced as recorded.
    assert abs(run.js_stamp_ns[-1] - time.time_ns()) < 60e9
    assert np.median(np.diff(run.js_stamp_ns)) == pytest.approx(1e7, rel=0.01)
    res = replay(run, [bc_model], teacher="none")
    assert res.summary["policies"]["bc"]["error_vs_recorded"]["rmse"] < 1e-5
