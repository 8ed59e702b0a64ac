"""The adb sync service (SYNC.TXT, v1 only): STAT, LIST, SEND, RECV, QUIT, for the fake handset."""
from __future__ import annotations

import os
import struct
from pathlib import Path

from device_tests.adbd_protocol import Stream


def serve_sync(stream: Stream, host_path, storage_full: bool = False) -> None:
    """Serve sync requests until QUIT. host_path maps a device path to the host file."""
    while True:
        ident, length = struct.unpack("<4sI", stream.read_exact(8))
        if ident == b"QUIT":
            return
        path = stream.read_exact(length).decode("utf-8", "replace")
        if ident == b"STAT":
            try:
                st = os.stat(host_path(path))
                stream.write(b"STAT" + struct.pack("<3I", st.st_mode, st.st_size & 0xFFFFFFFF, int(st.st_mtime)))
            except OSError:
                stream.write(b"STAT" + struct.pack("<3I", 0, 0, 0))
        elif ident == b"LIST":
            d = host_path(path)
            for entry in sorted(os.listdir(d)) if d.is_dir() else []:
                st = os.lstat(d / entry)
                name = entry.encode()
                stream.write(b"DENT" + struct.pack("<4I", st.st_mode, st.st_size & 0xFFFFFFFF,
                                                   int(st.st_mtime), len(name)) + name)
            stream.write(b"DONE" + bytes(16))
        elif ident == b"RECV":
            _recv(stream, host_path(path))
        elif ident == b"SEND":
            _send(stream, path, host_path, storage_full)
        else:
            _fail(stream, f"unknown sync request {ident!r}")
            return


def _recv(stream: Stream, source: Path) -> None:
    try:
        with open(source, "rb") as f:
            while chunk := f.read(64 * 1024):
                stream.write(b"DATA" + struct.pack("<I", len(chunk)) + chunk)
    except OSError as e:
        _fail(stream, e.strerror or str(e))
        return
    stream.write(b"DONE" + struct.pack("<I", 0))


def _send(stream: Stream, spec: str, host_path, storage_full: bool) -> None:
    path, _, mode = spec.rpartition(",")
    target = host_path(path)
    error = "write failed: No space left on device" if storage_full else None
    f = None
    if error is None:
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            f = open(target, "wb")
        except OSError as e:
            error = f"couldn't create file: {e.strerror}"
    mtime = 0
    while True:  # drain the whole transfer even when failing, as adbd does
        ident, length = struct.unpack("<4sI", stream.read_exact(8))
        if ident == b"DONE":
            mtime = length
            break
        if ident != b"DATA":
            error = f"invalid data message {ident!r}"
            break
        data = stream.read_exact(length)
        if f is not None:
            f.write(data)
    if f is not None:
        f.close()
    if error:
        if f is not None:
            target.unlink(missing_ok=True)
        _fail(stream, error)
        return
    os.chmod(target, int(mode or "420") & 0o777)
    os.utime(target, (mtime, mtime))
    stream.write(b"OKAY" + struct.pack("<I", 0))


def _fail(stream: Stream, message: str) -> None:
    msg = message.encode()
    stream.write(b"FAIL" + struct.pack("<I", len(msg)) + msg)
