"""Bag writing and reading: round trips, a bag built without the project's writer, and every kind of bad bag.

Each bad bag must raise a BagError subclass whose message names the problem, and reading must leave the bag's
bytes untouched (sha256 of every file before and after).
"""

from __future__ import annotations

import hashlib
import shutil
import sqlite3
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest

from koopman_control.bag import messages as M
from koopman_control.bag import topics as T
from koopman_control.bag.dataset import bags_to_dataset
from koopman_control.bag.observations import rebuild
from koopman_control.bag.reader import (
    BagFormatError,
    BagTopicError,
    BagTruncatedError,
    BagTypeError,
    BagUnsortedError,
    deserialize,
    inspect_bag,
    load_run,
)
from koopman_control.bag.recover import recover
from koopman_control.bag.writer import BagSink
from koopman_sim.gen3 import HOME_Q, JOINT_NAMES

T0 = 1_750_000_000 * 10**9
NS = 10**9


def tree_hash(path: Path) -> dict[str, str]:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def write_run(path: Path, storage: str = "mcap", *, seconds: float = 1.0, rate: float = 100.0,
              stamps: list[int] | None = None, skip: tuple[str, ...] = (), js_type: str | None = None,
              flush_interval_s: float = 1.0, close: bool = True) -> BagSink:
    """A small run through the project's writer: task topics, episode, joint states ramping from home."""
    sink = BagSink(path, storage=storage, flush_interval_s=flush_interval_s)
    for name in (T.JOINT_STATES, T.TARGET, T.PILLAR, T.EPISODE):
        if name not in skip:
            msgtype = js_type if (name == T.JOINT_STATES and js_type) else T.STACK_TOPICS[name].msgtype
            sink.add_topic(name, msgtype)
    if T.TARGET not in skip:
        sink.write(T.TARGET, T0, M.point_stamped(T0, [0.6, 0.0, 0.17]))
    if T.PILLAR not in skip:
        sink.write(T.PILLAR, T0 + 1, M.point_stamped(T0, [0.41, 0.0, 0.15]))
    sink.write(T.EPISODE, T0 + 2, M.episode(1, T0))
    n = round(seconds * rate)
    stamps = stamps if stamps is not None else [T0 + round((i + 1) * NS / rate) for i in range(n)]
    for i, st in enumerate(stamps):
        q = HOME_Q + 0.01 * i
        data = M.string("not a joint state") if js_type else M.joint_state(st, JOINT_NAMES, q, np.full(7, 0.1))
        sink.write(T.JOINT_STATES, T0 + round((i + 1) * NS / rate) + 300_000, data)
    if close:
        sink.close()
    return sink


@pytest.mark.parametrize("storage", ["mcap", "sqlite3"])
def test_round_trip_and_observations(tmp_path: Path, storage: str) -> None:
    bag = tmp_path / "run"
    write_run(bag, storage)
    before = tree_hash(bag)
    info = inspect_bag(bag)
    assert info.storage == storage and info.topics[T.JOINT_STATES].count == 100
    assert info.topics[T.JOINT_STATES].msgtype == "sensor_msgs/msg/JointState"
    run = load_run(bag)
    assert run.q.shape == (100, 7) and np.allclose(run.q[5], HOME_Q + 0.05)
    assert np.all(np.diff(run.js_stamp_ns) == 10_000_000)
    rb = rebuild(run, n_obs_steps=2, policy_rate_hz=10.0)
    assert len(rb.observations) == 10  # one per 100 ms tick, the first padded
    first = rb.observations[0]
    assert first.padded and np.allclose(first.history[-1, 14:], [0.6, 0.0, 0.17, 0.41, 0.0, 0.15])
    assert tree_hash(bag) == before


def test_rclpy_serialized_payload_decodes() -> None:
    """rclpy's serialize_message leaves trailing padding after the payload; the reader accepts it."""
    from rclpy.serialization import serialize_message
    from sensor_msgs.msg import JointState

    msg = JointState(name=list(JOINT_NAMES), position=[0.1] * 7, velocity=[0.2] * 7)
    msg.header.stamp.sec = 7
    data = serialize_message(msg)
    decoded = deserialize(data, "sensor_msgs/msg/JointState")
    assert decoded.header.stamp.sec == 7 and list(decoded.name) == list(JOINT_NAMES)
    with pytest.raises(ValueError, match="ends at byte"):
        deserialize(data + bytes(64), "sensor_msgs/msg/JointState")


# -- a bag written without the project's writer: plain sqlite3 + metadata.yaml, CDR packed by hand --------------
class Cdr:
    """Little-endian CDR with alignment relative to the payload start, written from the spec."""

    def __init__(self) -> None:
        self.buf = bytearray()

    def align(self, n: int) -> None:
        self.buf += bytes((-len(self.buf)) % n)

    def u32(self, v: int) -> None:
        self.align(4)
        self.buf += struct.pack("<I", v)

    def i32(self, v: int) -> None:
        self.align(4)
        self.buf += struct.pack("<i", v)

    def f64s(self, vals: list[float]) -> None:
        self.u32(len(vals))
        if vals:
            self.align(8)
            self.buf += struct.pack(f"<{len(vals)}d", *vals)

    def string(self, s: str) -> None:
        b = s.encode() + b"\0"
        self.u32(len(b))
        self.buf += b

    def header(self, stamp_ns: int, frame: str = "") -> None:
        self.i32(stamp_ns // NS)
        self.u32(stamp_ns % NS)
        self.string(frame)

    def bytes(self) -> bytes:
        return b"\x00\x01\x00\x00" + bytes(self.buf)


def hand_joint_state(stamp: int, q: np.ndarray) -> bytes:
    c = Cdr()
    c.header(stamp)
    c.u32(len(JOINT_NAMES))
    for n in JOINT_NAMES:
        c.string(n)
    c.f64s(q.tolist())
    c.f64s([0.0] * 7)
    c.f64s([])
    return c.bytes()


def hand_point(stamp: int, xyz: list[float]) -> bytes:
    c = Cdr()
    c.header(stamp, "base_link")
    c.align(8)
    c.buf += struct.pack("<3d", *xyz)
    return c.bytes()


def write_foreign_sqlite_bag(path: Path, n: int = 60) -> None:
    """A rosbag2 bag as an older rosbag2 (metadata version 5, db schema 3) writes it, by hand."""
    path.mkdir()
    db = sqlite3.connect(path / "foreign_0.db3")
    db.executescript("""
        CREATE TABLE schema(schema_version INTEGER PRIMARY KEY, ros_distro TEXT NOT NULL);
        INSERT INTO schema VALUES (3, 'humble');
        CREATE TABLE topics(id INTEGER PRIMARY KEY, name TEXT NOT NULL, type TEXT NOT NULL,
                            serialization_format TEXT NOT NULL, offered_qos_profiles TEXT NOT NULL);
        CREATE TABLE messages(id INTEGER PRIMARY KEY, topic_id INTEGER NOT NULL, timestamp INTEGER NOT NULL,
                              data BLOB NOT NULL);
        CREATE INDEX timestamp_idx ON messages (timestamp ASC);
    """)
    topics = [(1, "/joint_states", "sensor_msgs/msg/JointState"), (2, "/task/target", "geometry_msgs/msg/PointStamped"),
              (3, "/task/pillar", "geometry_msgs/msg/PointStamped")]
    db.executemany("INSERT INTO topics VALUES (?, ?, ?, 'cdr', '')", topics)
    rows = [(2, T0, hand_point(T0, [0.58, 0.02, 0.16])), (3, T0 + 1, hand_point(T0, [0.40, 0.01, 0.15]))]
    rows += [(1, T0 + (i + 1) * 20_000_000 + 500_000, hand_joint_state(T0 + (i + 1) * 20_000_000, HOME_Q + 0.001 * i))
             for i in range(n)]
    rows.reverse()  # inserted out of time order: the reader must sort by timestamp
    db.executemany("INSERT INTO messages (topic_id, timestamp, data) VALUES (?, ?, ?)", rows)
    db.commit()
    db.close()
    end = T0 + n * 20_000_000 + 500_000
    counts = {1: n, 2: 1, 3: 1}
    topic_yaml = "".join(
        f"    - topic_metadata:\n        name: {name}\n        type: {typ}\n        serialization_format: cdr\n"
        f"        offered_qos_profiles: ''\n      message_count: {counts[i]}\n" for i, name, typ in topics)
    (path / "metadata.yaml").write_text(
        "rosbag2_bagfile_information:\n  version: 5\n  storage_identifier: sqlite3\n"
        f"  relative_file_paths:\n    - foreign_0.db3\n  duration:\n    nanoseconds: {end - T0}\n"
        f"  starting_time:\n    nanoseconds_since_epoch: {T0}\n  message_count: {n + 2}\n"
        f"  topics_with_message_count:\n{topic_yaml}  compression_format: ''\n  compression_mode: ''\n")


def test_foreign_sqlite_bag_reads_and_converts(tmp_path: Path) -> None:
    bag = tmp_path / "foreign"
    write_foreign_sqlite_bag(bag)
    before = tree_hash(bag)
    run = load_run(bag)
    assert len(run.js_stamp_ns) == 60 and np.all(np.diff(run.js_stamp_ns) > 0)
    assert np.allclose(run.q[10], HOME_Q + 0.01) and np.allclose(run.vectors["target"][0][2], [0.58, 0.02, 0.16])
    # No commands recorded: actions are the next measured position.
    summary = bags_to_dataset([bag], tmp_path / "demos.h5", action_source="auto")
    from koopman_sim.dataset import load_dataset

    d = load_dataset(tmp_path / "demos.h5")
    assert summary["action_source"][str(bag)] == "next_q"
    assert d.n_episodes == 1 and d.n_steps == 11  # 1.2 s at 10 Hz = 12 ticks; the last has no successor
    assert np.allclose(d.action[:-1], d.obs[1:, :7], atol=1e-6)
    assert d.episode_seed.tolist() == [-1] and d.episode_side.tolist() == [-1]
    assert tree_hash(bag) == before


# -- bad bags ---------------------------------------------------------------------------------------------------
def test_truncated_mcap(tmp_path: Path) -> None:
    bag = tmp_path / "run"
    write_run(bag, "mcap", seconds=2.0, flush_interval_s=0.0)
    f = bag / "run.mcap"
    f.write_bytes(f.read_bytes()[: f.stat().st_size * 2 // 3])
    before = tree_hash(bag)
    with pytest.raises(BagTruncatedError, match=r"truncated or corrupt.*bag-recover"):
        load_run(bag)
    assert tree_hash(bag) == before
    res = recover(bag, tmp_path / "fixed")
    assert 0 < res["topics"][T.JOINT_STATES] < 200 and not res["source_was_complete"]
    run = load_run(tmp_path / "fixed")
    assert np.all(np.diff(run.js_stamp_ns) > 0)
    assert tree_hash(bag) == before


def test_truncated_sqlite(tmp_path: Path) -> None:
    bag = tmp_path / "run"
    write_run(bag, "sqlite3", seconds=20.0)
    f = bag / "run.db3"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    before = tree_hash(bag)
    with pytest.raises(BagTruncatedError, match="run"):
        load_run(bag)
    assert tree_hash(bag) == before


def test_unclosed_recording_is_recoverable(tmp_path: Path) -> None:
    """A recorder killed hard: no metadata.yaml, no MCAP footer; flushed chunks survive."""
    bag = tmp_path / "run"
    sink = write_run(bag, "mcap", seconds=1.0, flush_interval_s=0.0, close=False)
    sink._writer.storage.bio.flush()
    with pytest.raises(BagTruncatedError, match=r"no metadata.yaml.*not closed.*bag-recover"):
        load_run(bag)
    res = recover(bag, tmp_path / "fixed")
    assert res["topics"][T.JOINT_STATES] == 100
    assert len(load_run(tmp_path / "fixed").js_stamp_ns) == 100


def test_missing_topic(tmp_path: Path) -> None:
    bag = tmp_path / "run"
    write_run(bag, skip=(T.TARGET,))
    with pytest.raises(BagTopicError, match=r"missing topic\(s\) /task/target.*the bag has: .*/joint_states"):
        load_run(bag)


def test_wrong_message_type(tmp_path: Path) -> None:
    bag = tmp_path / "run"
    write_run(bag, js_type="std_msgs/msg/String")
    before = tree_hash(bag)
    with pytest.raises(BagTypeError, match="/joint_states has type std_msgs/msg/String, expected "
                                           "sensor_msgs/msg/JointState"):
        load_run(bag)
    assert tree_hash(bag) == before


def test_unsorted_stamps(tmp_path: Path) -> None:
    bag = tmp_path / "run"
    stamps = [T0 + (i + 1) * 10_000_000 for i in range(50)]
    stamps[20], stamps[21] = stamps[21], stamps[20]
    write_run(bag, stamps=stamps)
    with pytest.raises(BagUnsortedError, match="stamps on /joint_states go backwards: message 21"):
        load_run(bag)
    run = load_run(bag, allow_unsorted=True)
    assert run.dropped_unsorted == {T.JOINT_STATES: 1} and len(run.js_stamp_ns) == 49


def test_not_a_bag(tmp_path: Path) -> None:
    good = tmp_path / "run"
    write_run(good)
    archive = tmp_path / "run.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for p in good.iterdir():
            z.write(p, f"run/{p.name}")
    noise = tmp_path / "noise.mcap"
    noise.write_bytes(np.random.default_rng(0).bytes(4096))
    ros1 = tmp_path / "old.bag"
    ros1.write_bytes(b"#ROSBAG V2.0\n" + bytes(100))
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    bad_yaml = tmp_path / "bad_yaml"
    shutil.copytree(good, bad_yaml)
    (bad_yaml / "metadata.yaml").write_text("rosbag2_bagfile_information: [unclosed\n")
    cases = {archive: "zip archive", noise: "not a rosbag2 bag", ros1: "ROS 1 bag", empty_dir: "no metadata.yaml",
             tmp_path / "missing": "no such bag", bad_yaml: "metadata.yaml is not valid"}
    for path, words in cases.items():
        before = tree_hash(path) if path.exists() else {}
        with pytest.raises(BagFormatError, match=words):
            load_run(path)
        assert (tree_hash(path) if path.exists() else {}) == before
