"""Bundles are built in a staging directory and only renamed into place, with manifest.json written
last, after verification passed: nothing half-written ever looks finished."""
from __future__ import annotations

import errno
import fcntl
import hashlib
import io
import json
import math
import os
import shutil
import tarfile
from pathlib import Path

from . import __version__
from .errors import ExportError

MANIFEST = "manifest.json"
SCHEMA = "mcpm-export/manifest/1"
DIGEST_KEY = "manifest_sha256"


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

    Entering takes the output lock (``.OUT.lock`` beside ``out``, fcntl: a second export to the same
    ``out`` is refused), checks ``out`` (not a file or mount point; empty, or with ``force`` a bundle),
    removes what killed exports left (``.OUT.partial-PID`` / ``.OUT.old-PID`` of dead PIDs) and creates
    the staging dir, all before any slow stage. Leaving the block without finalize (an exception, a
    failed check, Ctrl-C) removes the staging dir and leaves any previous bundle at ``out`` untouched;
    ENOSPC becomes one ExportError line naming the path."""

    def __init__(self, out: Path, force: bool = False):
        self.out = Path(out).resolve()
        self.force = force
        self.dir = self._sibling(f"partial-{os.getpid()}")
        self.lock: OutputLock | None = None
        self.created = self.done = False

    def _sibling(self, tag: str) -> Path:
        return self.out.parent / f".{self.out.name}.{tag}"

    def __enter__(self) -> "Staging":
        check_out(self.out, self.force)
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self.lock = OutputLock(self._sibling("lock"), self.out)
            self._clean_stale()
            check_out(self.out, self.force)      # again, now that no other export can change it
            self.dir.mkdir()
            self.created = True
        except OSError as e:
            self.__exit__(None, None, None)
            raise ExportError(f"--out {self.out}: cannot write there ({e.strerror})") from None
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _clean_stale(self) -> None:
        """Staging / moved-aside folders whose export process is gone; a bundle moved aside by a
        finalize that was killed before the new one was renamed in goes back into place."""
        for p in sorted(self.out.parent.glob(f".{self.out.name}.*-*")):
            tag, _, pid = p.name[len(self.out.name) + 2:].rpartition("-")
            if tag not in ("partial", "old") or not pid.isdigit():
                continue
            if int(pid) != os.getpid() and pid_alive(int(pid)):
                continue
            if tag == "old" and not self.out.exists() and (p / MANIFEST).is_file():
                os.replace(p, self.out)
            else:
                shutil.rmtree(p, ignore_errors=True)

    def finalize(self, manifest: dict) -> Path:
        manifest = {"schema": SCHEMA, **manifest, "files": file_table(self.dir)}
        (self.dir / MANIFEST).write_text(manifest_text(manifest))
        if not self.out.exists():
            os.replace(self.dir, self.out)
        else:       # rename the old aside, the new in, then delete the old: always one complete bundle
            old = self._sibling(f"old-{os.getpid()}")
            try:
                os.replace(self.out, old)
            except OSError as e:
                raise ExportError(f"--out {self.out}: cannot move the previous bundle aside ({e.strerror}); "
                                  f"it is untouched") from None
            try:
                os.replace(self.dir, self.out)
            except OSError as e:
                os.replace(old, self.out)
                raise ExportError(f"--out {self.out}: cannot rename the new bundle into place "
                                  f"({e.strerror}); the previous bundle is untouched") from None
            shutil.rmtree(old, ignore_errors=True)
        self.done = True
        return self.out

    def __exit__(self, typ=None, exc=None, tb=None) -> None:
        full = self.created and disk_full(exc, self.dir)
        if self.created and not self.done:
            shutil.rmtree(self.dir, ignore_errors=True)
        if self.lock is not None:
            self.lock.release()
            self.lock = None
        if full:
            where = exc.filename if isinstance(exc, OSError) and exc.filename else self.out.parent
            raise ExportError(f"{where}: no space left on the device (nothing was written to --out "
                              f"{self.out})") from None


def disk_full(exc: BaseException | None, where: Path) -> bool:
    """Did ``exc`` come from a full filesystem? ENOSPC itself, or a failure of a tool writing there
    (a linker's "No space left on device") while ``where``'s filesystem has no room left."""
    if exc is None or isinstance(exc, (ExportError, KeyboardInterrupt)):
        return False
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if os.strerror(errno.ENOSPC) in str(exc) or os.strerror(errno.EDQUOT) in str(exc):
        return True
    try:
        st = os.statvfs(where)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < 64 * 1024


def check_out(out: Path, force: bool) -> None:
    """The cheap checks of an output folder (before anything slow)."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out}: exists and is not a directory")
    if out.is_dir() and os.path.ismount(out):
        raise ExportError(f"--out {out}: is a mount point; a bundle is renamed into place, so give a "
                          f"folder inside it (e.g. {out / out.name})")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise ExportError(f"--out {out}: directory is not empty (use --force to replace it)")
        if not (out / MANIFEST).is_file():
            raise ExportError(f"--out {out}: holds files but no bundle (no {MANIFEST}); --force only "
                              f"replaces a bundle: empty it or choose another --out")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class OutputLock:
    """An exclusive fcntl lock on ``path`` (holding the owner's PID), removed on release."""

    def __init__(self, path: Path, out: Path):
        self.path = path
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise ExportError(f"--out {out}: another export (pid {holder}) is writing there; wait "
                                  f"for it to finish or choose another --out") from None
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:       # else the previous holder removed the file between our open and lock: retry
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        try:
            os.unlink(self.path)
        finally:
            os.close(self.fd)


def manifest_digest(manifest: dict) -> str:
    """sha256 over everything in a manifest but this digest: edits to quality figures, versions or
    the files table are caught by `verify`."""
    body = {k: v for k, v in manifest.items() if k != DIGEST_KEY}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"),
                                     allow_nan=False).encode()).hexdigest()


def manifest_text(manifest: dict) -> str:
    """manifest.json's text: strict JSON (a NaN or Inf is refused), with its digest."""
    try:
        manifest = {**manifest, DIGEST_KEY: manifest_digest(manifest)}
    except ValueError:
        bad = [k for k, v in _leaves(manifest) if isinstance(v, float) and not math.isfinite(v)]
        raise ExportError(f"{MANIFEST}: refusing to write the non-finite number at "
                          f"'{bad[0] if bad else '?'}' (NaN/Inf is not JSON)") from None
    return json.dumps(manifest, indent=2, sort_keys=True) + "\n"


def _leaves(obj, where: str = ""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _leaves(v, f"{where}.{k}" if where else str(k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _leaves(v, f"{where}[{i}]")
    else:
        yield where, obj


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


# ---------------------------------------------------------------- reproducible archives
def normalize_member(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mode = 0o755 if info.isdir() or info.mode & 0o111 else 0o644
    return info


def normalize_tar(path: Path) -> None:
    """Rewrite a .tar in place with sorted members and normalized metadata (tools such as TVM's
    export_library stamp the build time and user into it)."""
    path = Path(path)
    with tarfile.open(path) as src:
        members = sorted((m for m in src.getmembers() if m.isfile() or m.isdir()), key=lambda m: m.name)
        data = {m.name: src.extractfile(m).read() for m in members if m.isfile()}
    tmp = path.with_name(f".{path.name}.tmp")
    with tarfile.open(tmp, "w", format=tarfile.GNU_FORMAT) as dst:
        for m in members:
            body = data.get(m.name)
            dst.addfile(normalize_member(m), io.BytesIO(body) if body is not None else None)
    os.replace(tmp, path)
