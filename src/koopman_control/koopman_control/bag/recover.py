"""Rebuild a readable bag from one whose recording was cut off (crash, SIGKILL, power loss, full disk).

The broken bag is only read; the salvaged messages go into a new bag. An MCAP file without its footer is
scanned record by record from the start and every complete chunk (and loose message) is kept, stopping at the
first incomplete record; a sqlite3 file yields every committed row (the recorder commits every second). A
message whose topic was declared in a lost part cannot be typed and is counted as lost.
"""

from __future__ import annotations

import struct
from io import BytesIO
from pathlib import Path
from typing import Any, BinaryIO

from koopman_control.bag.reader import MCAP_MAGIC, SQLITE_MAGIC, BagFormatError
from koopman_control.bag.writer import BagSink

OP_FOOTER, OP_SCHEMA, OP_CHANNEL, OP_MESSAGE, OP_CHUNK, OP_DATA_END = 0x02, 0x03, 0x04, 0x05, 0x06, 0x0F


def _u16(b: BinaryIO) -> int:
    return struct.unpack("<H", _exact(b, 2))[0]


def _u32(b: BinaryIO) -> int:
    return struct.unpack("<I", _exact(b, 4))[0]


def _u64(b: BinaryIO) -> int:
    return struct.unpack("<Q", _exact(b, 8))[0]


def _exact(b: BinaryIO, n: int) -> bytes:
    data = b.read(n)
    if len(data) != n:
        raise EOFError
    return data


def _str(b: BinaryIO) -> str:
    return _exact(b, _u32(b)).decode()


class _McapScan:
    def __init__(self) -> None:
        self.schemas: dict[int, str] = {}  # id -> type name
        self.channels: dict[int, tuple[str, int, bytes]] = {}  # id -> (topic, schema id, metadata)
        self.messages: list[tuple[int, int, bytes]] = []  # (channel, log time, data)
        self.complete = False

    def record(self, op: int, body: bytes) -> None:
        b = BytesIO(body)
        if op == OP_SCHEMA:
            sid = _u16(b)
            self.schemas[sid] = _str(b)
        elif op == OP_CHANNEL:
            cid, sid, topic = _u16(b), _u16(b), _str(b)
            _str(b)  # message encoding
            meta = _exact(b, _u32(b))
            self.channels[cid] = (topic, sid, meta)
        elif op == OP_MESSAGE:
            cid = _u16(b)
            _u32(b)
            log = _u64(b)
            _u64(b)
            self.messages.append((cid, log, b.read()))
        elif op == OP_CHUNK:
            _u64(b), _u64(b), _u64(b), _u32(b)
            compression = _str(b)
            data = _exact(b, _u64(b))
            if compression == "zstd":
                try:
                    from compression import zstd  # type: ignore[import-not-found]
                except ImportError:
                    from backports import zstd  # type: ignore[no-redef]
                data = zstd.decompress(data)
            elif compression:
                raise ValueError(f"chunk compression {compression!r} not supported")
            inner = BytesIO(data)
            while inner.tell() < len(data):
                iop = _exact(inner, 1)[0]
                self.record(iop, _exact(inner, _u64(inner)))


def scan_mcap(path: Path) -> _McapScan:
    scan = _McapScan()
    with path.open("rb") as f:
        if f.read(8) != MCAP_MAGIC:
            raise BagFormatError(f"{path}: not an MCAP file")
        while True:
            try:
                op = _exact(f, 1)[0]
                body = _exact(f, _u64(f))
            except EOFError:
                break  # the cut: everything before it is kept
            if op in (OP_FOOTER, OP_DATA_END):
                scan.complete = True
                break
            try:
                scan.record(op, body)
            except (EOFError, ValueError, UnicodeDecodeError):
                break
    return scan


def recover(src: str | Path, out: str | Path, storage: str | None = None) -> dict[str, Any]:
    """Salvage ``src`` (a bag folder or its .mcap/.db3 file) into the new bag ``out``; returns counts."""
    from rosbags.rosbag2.storage_mcap import get_qos

    src = Path(src)
    if src.is_dir():
        files = sorted(p for p in src.iterdir() if p.suffix in (".mcap", ".db3"))
        if not files:
            raise BagFormatError(f"{src}: no .mcap or .db3 file to recover")
        if len(files) > 1:
            raise BagFormatError(f"{src}: several storage files ({', '.join(p.name for p in files)}); recover each")
        file = files[0]
    else:
        file = src
    with file.open("rb") as f:
        head = f.read(16)
    written = lost = 0
    per_topic: dict[str, int] = {}
    if head.startswith(MCAP_MAGIC):
        scan = scan_mcap(file)
        kind = storage or "mcap"
        with BagSink(out, storage=kind, custom_data={"koopman.recovered_from": str(file)}) as sink:
            for cid, log, data in sorted(scan.messages, key=lambda m: m[1]):
                ch = scan.channels.get(cid)
                if ch is None or ch[1] not in scan.schemas:
                    lost += 1
                    continue
                topic, sid, meta = ch
                if not sink.has_topic(topic):
                    sink.add_topic(topic, scan.schemas[sid], get_qos(meta))
                sink.write(topic, log, data)
                per_topic[topic] = per_topic.get(topic, 0) + 1
                written += 1
        complete = scan.complete
    elif head.startswith(SQLITE_MAGIC):
        from rosbags.rosbag2 import Reader

        kind = storage or "sqlite3"
        try:
            reader = Reader(file)
            reader.open()
        except Exception as err:
            raise BagFormatError(f"{file}: the sqlite3 file cannot be read even in parts ({err})") from None
        with reader, BagSink(out, storage=kind, custom_data={"koopman.recovered_from": str(file)}) as sink:
            for conn in reader.connections:
                sink.add_topic(conn.topic, conn.msgtype, conn.ext.offered_qos_profiles)
            for conn, log, data in reader.messages():
                sink.write(conn.topic, log, data)
                per_topic[conn.topic] = per_topic.get(conn.topic, 0) + 1
                written += 1
        complete = True
    else:
        raise BagFormatError(f"{file}: neither an MCAP nor a sqlite3 file; nothing to recover")
    return {"source": str(file), "out": str(out), "messages": written, "unreadable": lost, "topics": per_topic,
            "source_was_complete": complete}
