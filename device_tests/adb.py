"""A thin wrapper over the `adb` command-line client (local or remote adb server via -H/-P)."""
from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass

from exporter.errors import ExportError


class HandsetError(Exception):
    """Something failed for one handset; the others carry on."""


@dataclass
class Adb:
    host: str | None = None
    port: int | None = None
    exe: str = "adb"

    def _base(self, serial: str | None = None) -> list[str]:
        if shutil.which(self.exe) is None:
            raise ExportError(f"`{self.exe}` not found on PATH: install Android platform-tools (Debian: apt-get install adb)")
        cmd = [self.exe]
        if self.host:
            cmd += ["-H", self.host]
        if self.port:
            cmd += ["-P", str(self.port)]
        return cmd + (["-s", serial] if serial else [])

    @property
    def where(self) -> str:
        return f"adb server {self.host or 'localhost'}:{self.port or 5037}"

    def run(self, args: list[str], serial: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
        """Run one adb command; raises subprocess.TimeoutExpired on timeout (the client is killed)."""
        return subprocess.run(self._base(serial) + args, stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, errors="replace", timeout=timeout)

    def devices(self) -> dict[str, str]:
        """serial -> state ("device", "offline", "unauthorized", ...) as the adb server sees them."""
        try:
            p = self.run(["devices"], timeout=30)
        except subprocess.TimeoutExpired:
            raise ExportError(f"{self.where} did not answer `adb devices` within 30 s") from None
        if p.returncode != 0:
            raise ExportError(f"cannot reach {self.where}: {_last_line(_both(p.stdout, p.stderr))}")
        out = {}
        for line in p.stdout.splitlines()[1:]:
            parts = line.split()
            if len(parts) >= 2 and not line.startswith("*"):
                out[parts[0]] = parts[1]
        return out

    def state(self, serial: str) -> str:
        """The handset's state, or "missing"."""
        try:
            return self.devices().get(serial, "missing")
        except ExportError:
            return "missing"

    def shell(self, serial: str, command: str, timeout: float = 120) -> tuple[int, str, str]:
        """(exit status, stdout, stderr) of a shell command (shell protocol v2 carries the exit status)."""
        p = self.run(["shell", command], serial, timeout)
        return p.returncode, p.stdout, p.stderr

    def check_shell(self, serial: str, command: str, what: str, timeout: float = 120) -> str:
        try:
            rc, out, err = self.shell(serial, command, timeout)
        except subprocess.TimeoutExpired:
            raise HandsetError(f"{what} timed out after {timeout:.0f} s") from None
        if rc != 0:
            raise HandsetError(f"{what} failed (exit {rc}): {_last_line(_both(out, err))}")
        return out

    def push(self, serial: str, locals_: list[str], remote: str, timeout: float = 600) -> None:
        try:
            p = self.run(["push", *locals_, remote], serial, timeout)
        except subprocess.TimeoutExpired:
            raise HandsetError(f"adb push to {remote} timed out after {timeout:.0f} s") from None
        if p.returncode != 0:
            raise HandsetError(f"adb push to {remote} failed: {_last_line(_both(p.stdout, p.stderr))}")

    def pull(self, serial: str, remote: str, local: str, timeout: float = 120) -> None:
        try:
            p = self.run(["pull", remote, local], serial, timeout)
        except subprocess.TimeoutExpired:
            raise HandsetError(f"adb pull {remote} timed out after {timeout:.0f} s") from None
        if p.returncode != 0:
            raise HandsetError(f"adb pull {remote} failed: {_last_line(_both(p.stdout, p.stderr))}")


def _last_line(text: str) -> str:
    """The most telling line of adb's output: the last one mentioning an error, else the last one."""
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower() or "fail" in ln.lower()]
    return (errors or lines or ["no output"])[-1]


def _both(out: str, err: str) -> str:
    return (out or "") + "\n" + (err or "")
