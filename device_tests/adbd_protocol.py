"""The device side of the ADB wire protocol (AOSP packages/modules/adb protocol.txt), over TCP.

Used by the fake handset (fake_handset.py). A message is a 24-byte little-endian header
`command, arg0, arg1, data_length, data_check, magic` (magic = command ^ 0xffffffff) followed
by `data_length` payload bytes. The host sends CNXN; the device answers CNXN with its banner
(or AUTH TOKEN when it wants a signature). Streams: host OPEN(local, 0, "service\\0") ->
device OKAY(our id, host id) or CLSE; WRTE carries data and every WRTE is acknowledged by
an OKAY before the writer may send the next one; CLSE closes the stream.
"""
from __future__ import annotations

import os
import queue
import socket
import struct
import threading

A_CNXN, A_AUTH, A_OPEN = 0x4E584E43, 0x48545541, 0x4E45504F
A_OKAY, A_CLSE, A_WRTE = 0x59414B4F, 0x45534C43, 0x45545257
A_VERSION = 0x01000001  # protocol version with "skip checksum"
MAX_PAYLOAD = 256 * 1024
AUTH_TOKEN, AUTH_SIGNATURE, AUTH_RSAPUBLICKEY = 1, 2, 3
_HEADER = struct.Struct("<6I")


class Closed(Exception):
    """The stream or the whole transport went away."""


def pack_message(command: int, arg0: int, arg1: int, data: bytes = b"") -> bytes:
    check = sum(data) & 0xFFFFFFFF
    return _HEADER.pack(command, arg0, arg1, len(data), check, command ^ 0xFFFFFFFF) + data


class Stream:
    """One OPENed service stream: blocking reads of the host's bytes, flow-controlled writes."""

    def __init__(self, transport: "Transport", local_id: int, remote_id: int, service: str):
        self.transport, self.local_id, self.remote_id, self.service = transport, local_id, remote_id, service
        self._inbox: queue.Queue[bytes | None] = queue.Queue()
        self._buf = b""
        self._can_send = threading.Event()
        self._can_send.set()
        self._write_lock = threading.Lock()
        self.closed = threading.Event()

    # called by the transport's reader thread
    def _deliver(self, data: bytes) -> None:
        self._inbox.put(data)

    def _acked(self) -> None:
        self._can_send.set()

    def _remote_closed(self) -> None:
        self.closed.set()
        self._can_send.set()
        self._inbox.put(None)

    # service side
    def read(self) -> bytes:
        """Next chunk from the host; b"" once the host closed the stream."""
        if self._buf:
            data, self._buf = self._buf, b""
            return data
        data = self._inbox.get()
        if data is None:
            self._inbox.put(None)
            return b""
        return data

    def read_exact(self, n: int) -> bytes:
        while len(self._buf) < n:
            data = self._inbox.get()
            if data is None:
                self._inbox.put(None)
                raise Closed(f"stream {self.service!r} closed by host")
            self._buf += data
        out, self._buf = self._buf[:n], self._buf[n:]
        return out

    def write(self, data: bytes) -> None:
        with self._write_lock:
            step = min(self.transport.max_payload, 64 * 1024)
            for i in range(0, len(data), step):
                while not self._can_send.wait(0.5):
                    if not self.transport.alive:
                        raise Closed("transport gone")
                if self.closed.is_set():
                    raise Closed(f"stream {self.service!r} closed by host")
                self._can_send.clear()
                self.transport.send(A_WRTE, self.local_id, self.remote_id, data[i:i + step])

    def close(self) -> None:
        if not self.closed.is_set():
            self.closed.set()
            try:
                self.transport.send(A_CLSE, self.local_id, self.remote_id)
            except OSError:
                pass
        self.transport.forget(self.local_id)


class Transport:
    """One TCP connection from an adb server. `open_service(stream)` runs each service in a thread."""

    def __init__(self, sock: socket.socket, banner: str, open_service, authorized: bool = True):
        self.sock, self.banner, self.open_service, self.authorized = sock, banner, open_service, authorized
        self.max_payload = 4096
        self.alive = True
        self._send_lock = threading.Lock()
        self._streams: dict[int, Stream] = {}
        self._next_id = 1
        self._lock = threading.Lock()

    def send(self, command: int, arg0: int, arg1: int, data: bytes = b"") -> None:
        with self._send_lock:
            self.sock.sendall(pack_message(command, arg0, arg1, data))

    def forget(self, local_id: int) -> None:
        with self._lock:
            self._streams.pop(local_id, None)

    def _recv_exact(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise Closed("connection closed")
            out += chunk
        return out

    def serve(self) -> None:
        """Reader loop; returns when the connection ends."""
        try:
            while True:
                command, arg0, arg1, length, _check, magic = _HEADER.unpack(self._recv_exact(24))
                if magic != command ^ 0xFFFFFFFF:
                    raise Closed(f"bad magic in message {command:#x}")
                data = self._recv_exact(length) if length else b""
                self._dispatch(command, arg0, arg1, data)
        except (Closed, OSError):
            pass
        finally:
            self.shutdown()

    def shutdown(self) -> None:
        self.alive = False
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        with self._lock:
            streams, self._streams = list(self._streams.values()), {}
        for s in streams:
            s._remote_closed()

    def _dispatch(self, command: int, arg0: int, arg1: int, data: bytes) -> None:
        if command == A_CNXN:
            self.max_payload = min(arg1 or 4096, MAX_PAYLOAD)
            if self.authorized:
                self.send(A_CNXN, A_VERSION, MAX_PAYLOAD, self.banner.encode())
            else:  # ask for a signature we will never accept (an unaccepted RSA key prompt)
                self.send(A_AUTH, AUTH_TOKEN, 0, os.urandom(20))
        elif command == A_AUTH:
            if arg0 == AUTH_SIGNATURE:  # reject every signature: ask again, host then offers its key
                self.send(A_AUTH, AUTH_TOKEN, 0, os.urandom(20))
            # AUTH_RSAPUBLICKEY: the user never taps "Allow", so stay silent
        elif command == A_OPEN:
            if not self.authorized:
                return
            service = data.rstrip(b"\0").decode("utf-8", "replace")
            with self._lock:
                local_id = self._next_id
                self._next_id += 1
                stream = Stream(self, local_id, arg0, service)
                self._streams[local_id] = stream
            threading.Thread(target=self._run_service, args=(stream,), daemon=True).start()
        elif command in (A_OKAY, A_WRTE, A_CLSE):
            with self._lock:
                stream = self._streams.get(arg1)
            if command == A_WRTE:
                if stream is None:
                    self.send(A_CLSE, 0, arg0)
                    return
                stream._deliver(data)
                self.send(A_OKAY, stream.local_id, stream.remote_id)
            elif stream is None:
                return
            elif command == A_OKAY:
                stream._acked()
            else:
                self.forget(stream.local_id)
                stream._remote_closed()

    def _run_service(self, stream: Stream) -> None:
        try:
            handler = self.open_service(stream.service)
            if handler is None:  # unknown service: refuse the OPEN
                self.forget(stream.local_id)
                self.send(A_CLSE, 0, stream.remote_id)
                return
            self.send(A_OKAY, stream.local_id, stream.remote_id)
            handler(stream)
        except (Closed, OSError):
            pass
        finally:
            stream.close()
