"""Bundles are built in a staging directory and only renamed into place, with manifest.json written
last, after verification passed: nothing half-written ever looks finished."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from . import __version__
from .errors import ExportError

MANIFEST = "manifest.json"
SCHEMA = "mcpm-export/manifest/1"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_table(root: Path) -> dict[str, dict]:
    """{relative posix path: {sha256, size}} for every file under root except the manifest."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            out[p.relative_to(root).as_posix()] = {"sha256": sha256_file(p), "size": p.stat().st_size}
    return out


def tool_versions() -> dict[str, str]:
    from importlib import metadata
    versions = {"mcpm_export": __version__}
    for dist in ("torch", "apache-tvm", "apache-tvm-ffi", "coremltools", "numpy"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return versions


class Staging:
    """``with Staging(out, force) as st: ...write into st.dir...; st.finalize(manifest)``.

    Leaving the block without finalize (an exception, a failed check) removes the staging dir and
    leaves any previous bundle at ``out`` untouched."""

    def __init__(self, out: Path, force: bool = False):
        self.out = Path(out).resolve()
        self.force = force
        self.dir = self.out.parent / f".{self.out.name}.partial-{os.getpid()}"
        self.done = False

    def __enter__(self) -> "Staging":
        if self.out.exists() and not self.out.is_dir():
            raise ExportError(f"--out {self.out}: exists and is not a directory")
        if self.out.is_dir() and any(self.out.iterdir()) and not self.force:
            raise ExportError(f"--out {self.out}: directory is not empty (use --force to replace it)")
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir.mkdir()
        except OSError as e:
            raise ExportError(f"--out {self.out}: cannot write there ({e.strerror})") from None
        return self

    def finalize(self, manifest: dict) -> Path:
        manifest = {"schema": SCHEMA, **manifest, "files": file_table(self.dir)}
        (self.dir / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        if self.out.exists():
            shutil.rmtree(self.out)
        os.replace(self.dir, self.out)
        self.done = True
        return self.out

    def __exit__(self, *exc) -> None:
        if not self.done:
            shutil.rmtree(self.dir, ignore_errors=True)


def read_manifest(bundle: Path) -> dict:
    path = Path(bundle) / MANIFEST
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ExportError(f"{bundle}: not a bundle (no {MANIFEST})") from None
    except json.JSONDecodeError as e:
        raise ExportError(f"{path}: not valid JSON ({e.msg})") from None


def check_files(bundle: Path, manifest: dict | None = None) -> list[str]:
    """One line per file that is missing, extra, or differs from the manifest."""
    bundle = Path(bundle)
    manifest = manifest or read_manifest(bundle)
    want = manifest.get("files", {})
    have = file_table(bundle)
    problems = []
    for rel, meta in sorted(want.items()):
        if rel not in have:
            problems.append(f"{bundle / rel}: missing")
        elif have[rel]["size"] != meta["size"]:
            problems.append(f"{bundle / rel}: size {have[rel]['size']} != manifest {meta['size']}")
        elif have[rel]["sha256"] != meta["sha256"]:
            problems.append(f"{bundle / rel}: sha256 differs from manifest")
    for rel in sorted(set(have) - set(want)):
        problems.append(f"{bundle / rel}: not listed in the manifest")
    return problems
