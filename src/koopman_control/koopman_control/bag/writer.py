"""Thread-safe rosbag2 writer with periodic flushing, on top of ``rosbags.rosbag2.Writer``.

Why a wrapper: ``rosbags`` keeps MCAP chunks of up to 1 MiB in memory and holds the whole sqlite3 recording in
one open transaction until ``close``, so a crash (or SIGKILL) loses everything since the start. Here the pending
MCAP chunk is written out and the sqlite3 transaction committed every ``flush_interval_s``; a recording cut off
hard loses at most that much and :mod:`koopman_control.bag.recover` rebuilds a readable bag from the rest.
Writes arrive from ROS callback threads while the main thread may be closing, hence one lock.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from koopman_control.bag.topics import typestore

STORAGES = ("mcap", "sqlite3")
BAG_VERSION = 9  # rosbag2 metadata version written by jazzy and kilted


class BagSink:
    def __init__(self, path: str | Path, storage: str = "mcap", flush_interval_s: float = 1.0,
                 custom_data: dict[str, str] | None = None) -> None:
        from rosbags.rosbag2 import StoragePlugin, Writer

        if storage not in STORAGES:
            raise ValueError(f"storage must be one of {', '.join(STORAGES)}, got {storage!r}")
        self.path = Path(path)
        if self.path.exists():
            raise FileExistsError(f"{self.path} exists already; bags are never overwritten, choose another --out")
        plugin = StoragePlugin.MCAP if storage == "mcap" else StoragePlugin.SQLITE3
        self.storage = storage
        self._writer = Writer(self.path, version=BAG_VERSION, storage_plugin=plugin)
        for k, v in (custom_data or {}).items():
            self._writer.set_custom_data(str(k), str(v))
        self._writer.open()
        if storage == "sqlite3":
            self._share_sqlite_connection()
        self._lock = threading.Lock()
        self._conns: dict[str, Any] = {}
        self.counts: dict[str, int] = {}
        self.bytes_written = 0
        self.flush_interval_s = flush_interval_s
        self._last_flush = time.monotonic()
        self._pending = 0
        self.closed = False

    def _share_sqlite_connection(self) -> None:
        """rosbags opens sqlite3 bound to the opening thread; topics and messages arrive on executor threads.

        Reopen the (freshly created, committed) database without the thread check: every access goes through
        ``self._lock``, which is what that check stands in for.
        """
        import sqlite3

        st = self._writer.storage
        st.conn.commit()
        st.conn.close()
        st.conn = sqlite3.connect(f"file:{st.path}", uri=True, check_same_thread=False)
        st.cursor = st.conn.cursor()

    def add_topic(self, topic: str, msgtype: str, qos_profiles: Sequence[Any] = ()) -> None:
        """Register a topic; its definition comes from the kilted typestore (what ``ros2 bag`` needs)."""
        ts = typestore()
        if msgtype not in ts.types:
            raise ValueError(f"topic {topic}: message type {msgtype} has no known definition; "
                             "only standard ROS 2 message types can be recorded")
        with self._lock:
            if topic in self._conns:
                return
            self._conns[topic] = self._writer.add_connection(topic, msgtype, typestore=ts,
                                                             offered_qos_profiles=list(qos_profiles))
            self.counts[topic] = 0

    def has_topic(self, topic: str) -> bool:
        return topic in self._conns

    def write(self, topic: str, timestamp_ns: int, data: bytes | memoryview) -> None:
        """Append serialized CDR bytes received at ``timestamp_ns`` (the bag's log time)."""
        with self._lock:
            if self.closed:
                return  # a callback racing with close: dropped, never a crash
            self._writer.write(self._conns[topic], int(timestamp_ns), data)
            self.counts[topic] += 1
            self.bytes_written += len(data)
            self._pending += 1
            if time.monotonic() - self._last_flush >= self.flush_interval_s:
                self._flush_locked()

    def flush(self) -> None:
        with self._lock:
            if not self.closed:
                self._flush_locked()

    def _flush_locked(self) -> None:
        self._last_flush = time.monotonic()
        if not self._pending:
            return
        self._pending = 0
        st = self._writer.storage
        if self.storage == "mcap":
            if st.chunk.msgs:  # rosbags internals: close the pending chunk so it reaches the file
                st.close_chunk()
            st.bio.flush()
        else:
            st.conn.commit()

    def close(self) -> None:
        """Write indexes and ``metadata.yaml``; idempotent."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            self._writer.close()

    @property
    def message_count(self) -> int:
        return sum(self.counts.values())

    def __enter__(self) -> BagSink:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()  # also on errors: what was recorded is kept


def qos_to_bag(profile: Any) -> Any:
    """An rclpy QoSProfile -> a ``rosbags`` Qos (what the bag stores as offered_qos_profiles)."""
    from rosbags.interfaces import Qos, QosDurability, QosHistory, QosLiveliness, QosReliability, QosTime

    def t(d: Any) -> Any:
        ns = int(d.nanoseconds)
        if ns >= 2**63 - 1 or ns == 0x7FFFFFFFFFFFFFFF:
            return QosTime(sec=0x7FFFFFFF, nsec=0xFFFFFFFF)  # "infinite", as rosbag2 writes it
        return QosTime(sec=ns // 1_000_000_000, nsec=ns % 1_000_000_000)

    return Qos(
        history=QosHistory(int(profile.history)),
        depth=int(profile.depth),
        reliability=QosReliability(int(profile.reliability)),
        durability=QosDurability(int(profile.durability)),
        deadline=t(profile.deadline),
        lifespan=t(profile.lifespan),
        liveliness=QosLiveliness(int(profile.liveliness)),
        liveliness_lease_duration=t(profile.liveliness_lease_duration),
        avoid_ros_namespace_conventions=bool(profile.avoid_ros_namespace_conventions),
    )
