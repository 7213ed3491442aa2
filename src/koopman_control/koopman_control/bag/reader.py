"""Open, validate and decode a recorded run; every problem is a :class:`BagError` that names it.

Reading goes through ``rosbags`` (read-only: sqlite3 files are opened ``immutable``, MCAP files ``rb``), so a bag
is never modified, not even by an interrupted read. Checks, in the order a user would want to hear of them:

* not a bag at all (missing path, a zip, a ROS 1 bag, random bytes, a folder without ``metadata.yaml``);
* truncated or unclosed storage (no MCAP footer, a corrupt sqlite3 file, fewer messages than the metadata says);
* missing topics the replay needs, topics with an unexpected message type, payloads that do not decode;
* header stamps that go backwards on a topic (a clock jump, or two publishers on one topic).

Decoding is pure Python (``rosbags``' CDR deserialiser with the kilted definitions), so bags are read without
a ROS installation. A few bytes of trailing CDR padding, which some serialisers (rclpy's ``serialize_message``)
leave after the payload, are accepted.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from koopman_control.bag import topics as T
from koopman_control.core.chunk import ActionChunk
from koopman_control.core.episodes import parse_episode
from koopman_control.core.observation import NS
from koopman_policy.contract import Contract, read_field

MAX_CDR_PADDING = 16
MCAP_MAGIC = b"\x89MCAP0\r\n"
SQLITE_MAGIC = b"SQLite format 3\x00"
RECOVER_HINT = "recover what was written with `koopman-control bag-recover {path} --out NEW_BAG`"


class BagError(ValueError):
    """A bag that cannot be used; the message names the bag and the problem."""


class BagFormatError(BagError):
    """Not a rosbag2 bag, an unsupported variant of one, or a payload that does not decode."""


class BagTruncatedError(BagError):
    """The storage file ends early or is corrupt (an interrupted copy, a crashed recorder)."""


class BagTopicError(BagError):
    """A topic the task needs is not in the bag."""


class BagTypeError(BagError):
    """A topic has a message type other than the one the stack publishes there."""


class BagUnsortedError(BagError):
    """Header stamps go backwards on a topic."""


# -- opening ------------------------------------------------------------------------------------------------------
def _sniff(path: Path) -> str:
    with path.open("rb") as f:
        head = f.read(32)
    if not head:
        return "an empty file"
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        return "a zip archive (unpack it and pass the bag folder inside)"
    if head.startswith(b"#ROSBAG V2.0"):
        return "a ROS 1 bag (convert it with `rosbags-convert --src BAG.bag --dst OUT`)"
    if head.startswith(b"\x1f\x8b"):
        return "a gzip file (unpack it first)"
    if head.startswith(b"\x28\xb5\x2f\xfd"):
        return "a zstd-compressed file (decompress it first)"
    return f"a file starting with {head[:12]!r}"


def _storage_files(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.suffix in (".mcap", ".db3") and p.is_file())


def _check_path(path: Path) -> None:
    """Reject what is clearly not a rosbag2 bag before ``rosbags`` sees it."""
    if not path.exists():
        raise BagFormatError(f"{path}: no such bag (file or folder)")
    if path.is_dir():
        if not (path / "metadata.yaml").is_file():
            files = _storage_files(path)
            if files:
                raise BagTruncatedError(
                    f"{path}: has {files[0].name} but no metadata.yaml: the recording was not closed (crashed or "
                    f"killed); {RECOVER_HINT.format(path=path)} (or `ros2 bag reindex {path}` where ROS is installed)")
            raise BagFormatError(f"{path}: not a rosbag2 bag: the folder has no metadata.yaml and no .mcap/.db3 file")
        return
    with path.open("rb") as f:
        head = f.read(16)
    if path.suffix == ".mcap" and head.startswith(MCAP_MAGIC):
        return
    if path.suffix == ".db3" and head.startswith(SQLITE_MAGIC):
        return
    if head.startswith(MCAP_MAGIC) or head.startswith(SQLITE_MAGIC):
        kind = "MCAP" if head.startswith(MCAP_MAGIC) else "sqlite3"
        raise BagFormatError(f"{path}: an {kind} file without its usual suffix; rename it to "
                             f"{path.stem}{'.mcap' if kind == 'MCAP' else '.db3'}")
    raise BagFormatError(f"{path}: not a rosbag2 bag: {_sniff(path)}")


def _translate(path: Path, err: Exception) -> BagError:
    text = str(err)
    low = text.lower()
    truncated = ("end magic", "seems to be empty", "invalid mcap footer", "unexpected end", "could not read",
                 "malformed", "not a database", "file is not a database", "disk image", "summary offset",
                 "short read", "out of range", "incomplete")
    if any(k in low for k in truncated):
        return BagTruncatedError(f"{path}: storage is truncated or corrupt ({text}); {RECOVER_HINT.format(path=path)}")
    if "not in timestamp order" in low:
        return BagUnsortedError(f"{path}: messages are not in timestamp order and the file has no index ({text})")
    if "profile is not ros2" in low:
        return BagFormatError(f"{path}: an MCAP file from another tool: its profile is not 'ros2' (ROS 2 CDR)")
    if "serialization format" in low:
        return BagFormatError(f"{path}: {text} (only ROS 2 CDR payloads can be read)")
    if "version" in low and "not supported" in low:
        return BagFormatError(f"{path}: {text} (written by a newer rosbag2 than this reader knows)")
    if "metadata" in low or "yaml" in low:
        return BagFormatError(f"{path}: metadata.yaml is not valid rosbag2 metadata ({text})")
    return BagFormatError(f"{path}: cannot read the bag ({type(err).__name__}: {text})")


class _OpenBag:
    """A validated ``rosbags`` reader; use as a context manager."""

    def __init__(self, path: str | Path) -> None:
        from rosbags.rosbag2 import Reader

        self.path = Path(path)
        _check_path(self.path)
        try:
            self.reader = Reader(self.path)
            self.reader.open()
        except BagError:
            raise
        except Exception as err:  # rosbags raises ReaderError, FileNotFoundError, apsw/sqlite errors, KeyError
            raise _translate(self.path, err) from None

    def __enter__(self) -> _OpenBag:
        return self

    def __exit__(self, *exc: object) -> None:
        self.reader.close()

    @property
    def storage(self) -> str:
        files = _storage_files(self.path) if self.path.is_dir() else [self.path]
        return "mcap" if files and files[0].suffix == ".mcap" else "sqlite3"

    def messages(self, topics: Iterable[str] | None = None) -> Iterator[tuple[Any, int, bytes]]:
        wanted = set(topics) if topics is not None else None
        conns = [c for c in self.reader.connections if wanted is None or c.topic in wanted]
        if not conns:
            return
        try:
            yield from self.reader.messages(connections=conns)
        except BagError:
            raise
        except Exception as err:
            raise _translate(self.path, err) from None


# -- inspection ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TopicInfo:
    name: str
    msgtype: str
    count: int
    qos: list[dict[str, Any]]


@dataclass(frozen=True)
class BagInfo:
    path: str
    storage: str
    start_ns: int
    duration_s: float
    message_count: int
    topics: dict[str, TopicInfo]
    custom_data: dict[str, str]
    ros_distro: str | None
    size_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "storage": self.storage, "start_ns": self.start_ns, "duration_s": self.duration_s,
                "message_count": self.message_count, "size_bytes": self.size_bytes, "ros_distro": self.ros_distro,
                "custom_data": self.custom_data,
                "topics": {n: {"type": t.msgtype, "count": t.count} for n, t in self.topics.items()}}


def _qos_dict(q: Any) -> dict[str, Any]:
    return {"reliability": q.reliability.name.lower(), "durability": q.durability.name.lower(),
            "history": q.history.name.lower(), "depth": int(q.depth)}


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


def inspect_bag(path: str | Path) -> BagInfo:
    """Metadata only (no message is decoded): storage, duration, topics with types and counts."""
    with _OpenBag(path) as bag:
        r = bag.reader
        tops: dict[str, TopicInfo] = {}
        for c in r.connections:
            prev = tops.get(c.topic)
            if prev is not None and prev.msgtype != c.msgtype:
                raise BagTypeError(f"{bag.path}: topic {c.topic} is recorded with two types, "
                                   f"{prev.msgtype} and {c.msgtype}")
            qos = [_qos_dict(q) for q in getattr(c.ext, "offered_qos_profiles", [])]
            tops[c.topic] = TopicInfo(c.topic, c.msgtype, (prev.count if prev else 0) + int(c.msgcount), qos)
        count = int(r.message_count)
        return BagInfo(str(bag.path), bag.storage, int(r.start_time) if count else 0,
                       (int(r.duration) / NS) if count else 0.0, count, tops,
                       dict(getattr(r.metadata, "custom", None) or {}) if hasattr(r, "metadata") else {},
                       getattr(r, "ros_distro", None), _size(bag.path))


# -- decoding -----------------------------------------------------------------------------------------------------
def deserialize(data: bytes | memoryview, msgtype: str) -> Any:
    """CDR bytes -> a ``rosbags`` message object; tolerant of trailing alignment padding only."""
    ts = T.typestore()
    raw = bytes(data[:4])
    if len(data) < 4 or raw[:2] not in (b"\x00\x00", b"\x00\x01"):
        raise ValueError("not CDR: bad encapsulation header")
    md = ts.get_msgdef(msgtype)
    func = md.deserialize_cdr_le if raw[1] else md.deserialize_cdr_be
    try:
        msg, pos = func(data[4:], 0, md.cls, ts)
    except Exception as err:  # struct.error, UnicodeDecodeError, IndexError on short buffers
        raise ValueError(f"{type(err).__name__}: {err}") from None
    extra = len(data) - 4 - pos
    if extra < 0 or extra > MAX_CDR_PADDING:
        raise ValueError(f"payload is {len(data)} bytes but the {msgtype} in it ends at byte {pos + 4}")
    return msg


def stamp_ns(t: Any) -> int:
    return int(t.sec) * NS + int(t.nanosec)


def chunk_from_bag_msg(msg: Any, joint_names: Sequence[str]) -> ActionChunk:
    """A recorded JointTrajectory -> :class:`ActionChunk` in ``joint_names`` order (as ``convert.chunk_from_msg``)."""
    if not len(msg.points):
        raise ValueError("empty chunk: no points")
    index = {n: i for i, n in enumerate(msg.joint_names)}
    missing = [n for n in joint_names if n not in index]
    if missing:
        raise ValueError(f"chunk lacks joints {', '.join(missing)}")
    perm = [index[n] for n in joint_names]
    rows = []
    for k, p in enumerate(msg.points):
        if len(p.positions) != len(msg.joint_names):
            raise ValueError(f"point {k} has {len(p.positions)} positions for {len(msg.joint_names)} joints")
        rows.append(np.asarray(p.positions, dtype=np.float64))
    stamp = stamp_ns(msg.header.stamp)
    times = np.array([stamp + stamp_ns(p.time_from_start) for p in msg.points], dtype=np.int64)
    return ActionChunk(stamp, times, np.stack(rows)[:, perm], parse_episode(msg.header.frame_id))


@dataclass(frozen=True)
class RecordedObservation:
    stamp_ns: int
    history: np.ndarray  # (T, D) float32
    names: tuple[str, ...]
    episode: int
    stamps_ns: np.ndarray  # (T,) int64 stamps of the history steps


@dataclass
class RecordedRun:
    """Everything the replay and the dataset converter need from one bag, decoded into arrays."""

    info: BagInfo
    joint_names: tuple[str, ...]
    js_stamp_ns: np.ndarray  # (N,) int64 header stamps, strictly increasing after validation
    js_log_ns: np.ndarray  # (N,) int64 bag receive times
    q: np.ndarray  # (N, J) float64 in joint_names order
    qd: np.ndarray  # (N, J); zeros when the bag's joint states carry no velocities
    contract: Contract  # the observation it was read for
    vectors: dict[str, list[tuple[int, int, np.ndarray]]]  # feature -> (stamp, log time, values)
    episodes: list[tuple[int, int, int]]  # (log time, episode id, start stamp)
    results: list[dict[str, Any]] = field(default_factory=list)
    chunks: list[ActionChunk] = field(default_factory=list)
    holds: list[int] = field(default_factory=list)  # stamps of the hold commands (chunks without points)
    teacher_chunks: list[ActionChunk] = field(default_factory=list)
    observations: list[RecordedObservation] = field(default_factory=list)
    modes: list[tuple[int, str]] = field(default_factory=list)  # (log time, mode)
    dropped_unsorted: dict[str, int] = field(default_factory=dict)

    @property
    def path(self) -> str:
        return self.info.path

    @property
    def duration_s(self) -> float:
        if len(self.js_stamp_ns) < 2:
            return 0.0
        return float(self.js_stamp_ns[-1] - self.js_stamp_ns[0]) / NS


def _require(info: BagInfo, required: Sequence[str], types: dict[str, str]) -> None:
    for name, msgtype in types.items():
        t = info.topics.get(name)
        if t is not None and t.msgtype != msgtype:
            raise BagTypeError(f"{info.path}: topic {name} has type {t.msgtype}, expected {msgtype} "
                               "(is this a bag of another robot stack, or of another task?)")
    missing = [n for n in required if n not in info.topics]
    if missing:
        have = ", ".join(sorted(info.topics)) or "none"
        raise BagTopicError(f"{info.path}: missing topic(s) {', '.join(missing)} needed here; the bag has: {have}")
    empty = [n for n in required if info.topics[n].count == 0]
    if empty:
        raise BagTopicError(f"{info.path}: topic(s) {', '.join(empty)} are in the bag but have no messages")


def load_run(path: str | Path, contract: Contract | None = None, allow_unsorted: bool = False) -> RecordedRun:
    """Read and validate a recorded run of a task (``contract``: its joints and inputs, default the reach task;
    see the module docstring for the checks); its joint states and input topics must be in the bag.

    ``allow_unsorted`` drops samples whose header stamp does not advance (what the state ingest does live)
    instead of refusing the bag.
    """
    from koopman_control.contracts import resolve_contract

    contract = contract or resolve_contract("")
    features = [f for f in contract.observation if f.kind != "image"]
    jn = tuple(dict.fromkeys(j for f in features for j in f.joints))
    needs_velocity = any(f.kind == "joint_velocity" for f in features)
    inputs = {T.in_bag(f.topic): f for f in features if f.kind == "vector" and f.topic}
    types = {n: t.msgtype for n, t in T.STACK_TOPICS.items()} | {n: f.type for n, f in inputs.items()}
    info = inspect_bag(path)
    _require(info, [T.JOINT_STATES, *inputs], types)
    wanted = [n for n in {**T.STACK_TOPICS, **inputs} if n in info.topics and n not in (T.CAMERA, T.DIAGNOSTICS)]
    js_stamp: list[int] = []
    js_log: list[int] = []
    qs: list[np.ndarray] = []
    qds: list[np.ndarray] = []
    run = RecordedRun(info, jn, np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, len(jn))),
                      np.zeros((0, len(jn))), contract, {f.name: [] for f in inputs.values()}, [])
    counts: dict[str, int] = {}
    last_stamp: dict[str, tuple[int, int]] = {}  # topic -> (stamp, index)
    dropped: dict[str, int] = {}
    index_cache: dict[tuple[str, ...], list[int]] = {}

    def monotonic(topic: str, stamp: int, i: int, strict: bool) -> bool:
        prev = last_stamp.get(topic)
        if prev is not None and (stamp < prev[0] or (strict and stamp == prev[0])):
            if allow_unsorted:
                dropped[topic] = dropped.get(topic, 0) + 1
                return False
            raise BagUnsortedError(
                f"{info.path}: header stamps on {topic} go backwards: message {i} is stamped {stamp / NS:.6f} s, "
                f"after message {prev[1]} at {prev[0] / NS:.6f} s (clock jump, or two publishers on one topic?); "
                "pass --allow-unsorted to drop such samples as the live ingest does")
        last_stamp[topic] = (stamp, i)
        return True

    with _OpenBag(path) as bag:
        for conn, log_ns, data in bag.messages(wanted):
            topic = conn.topic
            i = counts.get(topic, 0)
            counts[topic] = i + 1
            try:
                msg = deserialize(data, conn.msgtype)
            except ValueError as err:
                raise BagFormatError(f"{info.path}: message {i} on {topic} does not decode as {conn.msgtype}: {err}"
                                     ) from None
            try:
                if topic == T.JOINT_STATES:
                    stamp = stamp_ns(msg.header.stamp)
                    if not monotonic(topic, stamp, i, strict=True):
                        continue
                    key = tuple(msg.name)
                    perm = index_cache.get(key)
                    if perm is None:
                        idx = {n: k for k, n in enumerate(key)}
                        missing = [n for n in jn if n not in idx]
                        if missing:
                            raise ValueError(f"joint_states lacks {', '.join(missing)} (has {list(key)})")
                        perm = index_cache[key] = [idx[n] for n in jn]
                    pos, vel = np.asarray(msg.position, np.float64), np.asarray(msg.velocity, np.float64)
                    if not needs_velocity and len(vel) == 0:
                        vel = np.zeros(len(key))
                    if len(pos) != len(key) or len(vel) != len(key):
                        raise ValueError(f"{len(pos)} positions / {len(vel)} velocities for {len(key)} names")
                    js_stamp.append(stamp)
                    js_log.append(log_ns)
                    qs.append(pos[perm])
                    qds.append(vel[perm])
                elif topic in inputs:
                    f = inputs[topic]
                    stamp = stamp_ns(msg.header.stamp) if f.stamped else log_ns
                    values = np.array([read_field(msg, fld, f.wrap_center) for fld in f.fields], dtype=np.float64)
                    run.vectors[f.name].append((stamp, log_ns, values))
                elif topic == T.EPISODE:
                    episode = parse_episode(msg.frame_id)
                    if episode is None:
                        raise ValueError(f"episode announcement frame_id {msg.frame_id!r} is not episode_<id>")
                    run.episodes.append((log_ns, episode, stamp_ns(msg.stamp)))
                elif topic == T.EPISODE_RESULT:
                    try:
                        res = json.loads(msg.data)
                    except json.JSONDecodeError as err:
                        raise ValueError(f"episode result is not JSON: {err}") from None
                    if isinstance(res, dict):
                        run.results.append({**res, "_log_ns": log_ns})
                elif topic == T.ACTION_CHUNK and not len(msg.points):  # the hold command
                    run.holds.append(stamp_ns(msg.header.stamp))
                elif topic in (T.ACTION_CHUNK, T.TEACHER_CHUNK):
                    chunk = chunk_from_bag_msg(msg, contract.action_joints)
                    if not monotonic(topic, chunk.stamp_ns, i, strict=False):
                        continue
                    (run.chunks if topic == T.ACTION_CHUNK else run.teacher_chunks).append(chunk)
                elif topic == T.OBSERVATION:
                    if not len(msg.points):  # the ingest's stop marker: its inputs failed here
                        continue
                    hist = np.asarray([p.positions for p in msg.points], dtype=np.float32)
                    st = stamp_ns(msg.header.stamp)
                    steps = np.array([st + stamp_ns(p.time_from_start) for p in msg.points], dtype=np.int64)
                    run.observations.append(RecordedObservation(st, hist, tuple(msg.joint_names),
                                                                parse_episode(msg.header.frame_id) or 0, steps))
                elif topic == T.MODE:
                    run.modes.append((log_ns, str(msg.data)))
            except BagError:
                raise
            except (ValueError, AttributeError) as err:
                raise BagFormatError(f"{info.path}: message {i} on {topic}: {err}") from None
    short = {t: (info.topics[t].count, counts.get(t, 0)) for t in wanted if counts.get(t, 0) < info.topics[t].count}
    if short:
        desc = ", ".join(f"{t} {got} of {want}" for t, (want, got) in short.items())
        raise BagTruncatedError(f"{info.path}: fewer messages than metadata.yaml lists ({desc}): the storage file "
                                f"was cut short; {RECOVER_HINT.format(path=info.path)}")
    if not js_stamp:
        raise BagTopicError(f"{info.path}: no usable {T.JOINT_STATES} samples")
    run.js_stamp_ns = np.asarray(js_stamp, dtype=np.int64)
    run.js_log_ns = np.asarray(js_log, dtype=np.int64)
    run.q = np.stack(qs)
    run.qd = np.stack(qds)
    run.dropped_unsorted = dropped
    return run
