"""Playback schedule of a bag for the live stack: which bytes to publish when, with which stamp.

Messages are published at their recorded receive times scaled by ``1 / rate`` from the start of playback. The
stack judges freshness against the system clock (stale after 50 ms), so stamps are moved onto the playback
clock: ``stamp' = T0 + (stamp - t0) / rate`` with ``t0`` the bag's first receive time and ``T0`` the wall time
playback started. At rate 1 the stack sees the recorded sample spacing and the recorded transport delay
exactly; at other rates time is dilated uniformly (stamps, spacing, and hence the velocities the policy is fed
are unchanged, the tick grid follows the dilated stamps). Only the stamp bytes are rewritten: a header's stamp
sits at CDR bytes 4..12 of every type that starts with ``std_msgs/Header``, so nothing is re-encoded.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from koopman_control.bag import topics as T
from koopman_control.bag.reader import BagTopicError, _OpenBag, inspect_bag
from koopman_control.core.observation import NS


@dataclass(frozen=True)
class PlayItem:
    log_ns: int  # recorded receive time
    topic: str
    data: bytes
    stamp_ns: int | None  # header stamp (None: the type has no header)


@dataclass
class Playback:
    items: list[PlayItem]
    types: dict[str, str]
    qos: dict[str, list[Any]]  # offered QoS profiles (rosbags Qos) per topic
    t0_ns: int

    @property
    def duration_s(self) -> float:
        return (self.items[-1].log_ns - self.t0_ns) / NS if self.items else 0.0


def read_stamp(data: bytes) -> int:
    fmt = "<iI" if data[1] else ">iI"
    sec, nsec = struct.unpack_from(fmt, data, 4)
    return sec * NS + nsec


def restamp(data: bytes, stamp_ns: int) -> bytes:
    """The same CDR message with its header stamp replaced (byte order from the encapsulation header)."""
    fmt = "<iI" if data[1] else ">iI"
    return data[:4] + struct.pack(fmt, int(stamp_ns // NS), int(stamp_ns % NS)) + data[12:]


def load_playback(path: str | Path, topics: Sequence[str] | None = None) -> Playback:
    """Read the messages to play (default: the sensor-side topics present in the bag) into memory."""
    info = inspect_bag(path)
    wanted = list(topics) if topics else [t for t in T.PLAYBACK_TOPICS if t in info.topics]
    missing = [t for t in wanted if t not in info.topics]
    if missing:
        raise BagTopicError(f"{info.path}: cannot play {', '.join(missing)}: not in the bag "
                            f"(has {', '.join(sorted(info.topics))})")
    if T.JOINT_STATES not in wanted:
        raise BagTopicError(f"{info.path}: nothing to drive the stack with: {T.JOINT_STATES} is not played")
    items: list[PlayItem] = []
    headers = {t: T.has_header(info.topics[t].msgtype) for t in wanted}
    qos: dict[str, list[Any]] = {}
    with _OpenBag(path) as bag:
        for conn in bag.reader.connections:
            if conn.topic in wanted:
                qos[conn.topic] = list(getattr(conn.ext, "offered_qos_profiles", []))
        for conn, log_ns, data in bag.messages(wanted):
            data = bytes(data)
            items.append(PlayItem(log_ns, conn.topic, data, read_stamp(data) if headers[conn.topic] else None))
    items.sort(key=lambda i: i.log_ns)
    return Playback(items, {t: info.topics[t].msgtype for t in wanted}, qos, items[0].log_ns if items else 0)


def schedule(pb: Playback, item: PlayItem, start_wall_ns: int, rate: float) -> tuple[int, bytes]:
    """(wall time to publish at, payload with its stamp moved onto the playback clock)."""
    due = start_wall_ns + round((item.log_ns - pb.t0_ns) / rate)
    if item.stamp_ns is None:
        return due, item.data
    return due, restamp(item.data, start_wall_ns + round((item.stamp_ns - pb.t0_ns) / rate))
