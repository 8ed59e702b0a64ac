"""pytest fixtures for fake handsets driven by the real adb client/server (imported by tests/conftest.py).

`adb_server`: a private adb server on its own port (HOME points at a temp dir so its adbkey stays
there), killed with `adb -P PORT kill-server` afterwards. `fake_handset(**knobs)`: start a FakeHandset
and `adb connect` it; returns (handset, serial). `fixture_runner`: the aarch64 test-fixture program
(device_tests/fixtures/fake_runner.cpp, NOT the real runner) cross-compiled once per session.
`make_bundle(runner)`: a minimal bundle directory around a runner binary.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from device_tests.adb import Adb
from device_tests.fake_handset import FakeHandset
from exporter.bundle import file_table

FIXTURE_SRC = Path(__file__).parent / "fixtures" / "fake_runner.cpp"


def _free_port() -> int:
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if not 5555 <= port <= 5585:  # the adb server scans these for emulators
            return port


class AdbServer:
    def __init__(self, home: Path):
        self.port = _free_port()
        self.env = dict(os.environ, HOME=str(home), ANDROID_ADB_SERVER_PORT=str(self.port))
        self.env.pop("ANDROID_SERIAL", None)
        self.adb = Adb(port=self.port)

    def run(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(["adb", "-P", str(self.port), *args], env=self.env, capture_output=True,
                              text=True, timeout=timeout, stdin=subprocess.DEVNULL)

    def connect(self, handset: FakeHandset, want: str = "device", timeout: float = 15) -> str:
        serial = handset.address
        self.run("connect", serial)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.adb.devices().get(serial) == want:
                return serial
            time.sleep(0.1)
        raise AssertionError(f"{serial} never reached state {want!r}: {self.adb.devices()}")


@pytest.fixture
def adb_server(tmp_path_factory):
    if shutil.which("adb") is None:
        pytest.skip("adb client not installed")
    server = AdbServer(tmp_path_factory.mktemp("adbhome"))
    p = server.run("start-server")
    assert p.returncode == 0, p.stderr
    yield server
    server.run("kill-server")


@pytest.fixture
def fake_handset(adb_server, tmp_path_factory):
    made: list[FakeHandset] = []

    def make(**knobs) -> tuple[FakeHandset, str]:
        want = "unauthorized" if knobs.get("unauthorized") else "device"
        root = tmp_path_factory.mktemp("handset")
        handset = FakeHandset(serial_hint=f"fake{len(made)}", root=root, **knobs).start()
        made.append(handset)
        return handset, adb_server.connect(handset, want)

    yield make
    for h in made:
        h.go_offline()


@pytest.fixture(scope="session")
def fixture_runner(tmp_path_factory) -> Path:
    gxx = shutil.which("aarch64-linux-gnu-g++")
    if gxx is None or shutil.which("qemu-aarch64-static") is None:
        pytest.skip("aarch64-linux-gnu-g++ / qemu-aarch64-static not installed")
    out = tmp_path_factory.mktemp("fixture-runner") / "mcpm-run"
    subprocess.run([gxx, "-static", "-O1", "-o", str(out), str(FIXTURE_SRC)], check=True)
    return out


def write_test_manifest(bundle: Path, fields: dict) -> None:
    """(Re)write a test bundle's manifest over the files it holds now (the harness checks them)."""
    manifest = {"schema": "mcpm-export/manifest/1", **fields, "files": file_table(bundle)}
    (bundle / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture
def make_bundle(tmp_path):
    def make(runner: Path, name: str = "tiny-android", extra: dict[str, bytes] | None = None) -> Path:
        b = tmp_path / name
        (b / "runner").mkdir(parents=True)
        shutil.copy2(runner, b / "runner" / "mcpm-run")
        for rel, data in {"params_shard_0.bin": os.urandom(150_000),
                          "tensor-cache.json": b'{"records": []}',
                          "mlc-chat-config.json": b'{"vocab_size": 8192}',
                          "lib/host/model.so": b"x86_64 host build, never pushed", **(extra or {})}.items():
            (b / rel).parent.mkdir(parents=True, exist_ok=True)
            (b / rel).write_bytes(data)
        write_test_manifest(b, {"recipe": "tiny", "target": "android", "quantization": {"scheme": "q4f16"},
                                "libs": {"host": {"so": "lib/host/model.so"}}})
        return b

    return make
