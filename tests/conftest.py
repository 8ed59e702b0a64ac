"""Shared pytest fixtures."""

# Fake handsets speaking the real ADB protocol, driven by the real adb client/server (device_tests/testing.py).
from device_tests.testing import adb_server, fake_handset, fixture_runner, make_bundle  # noqa: F401

# The embedded trained model (recipe `tiny`), loaded once per session.
import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from exporter.recipes import EMBEDDED_DIR  # noqa: E402

TINY_DIR = EMBEDDED_DIR / "tinycpm-docs"


@pytest.fixture(scope="session")
def tiny():
    from exporter import api
    return api.load("tiny")


@pytest.fixture(scope="session")
def tiny_quantized(tiny):
    """(QuantizedModel, int4 reference model, QualityReport) for tiny with its recipe's scheme."""
    from exporter import api
    return api.quantize(tiny)


@pytest.fixture
def tiny_copy(tmp_path):
    """A writable copy of the tiny checkpoint, for corrupting."""
    dst = tmp_path / "ckpt"
    shutil.copytree(TINY_DIR, dst)
    for p in dst.iterdir():
        p.chmod(0o644)
    return dst
