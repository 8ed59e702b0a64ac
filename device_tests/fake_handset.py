"""A fake Android handset that speaks the real ADB device protocol on a loopback TCP port.

Drive it with the real `adb` client/server: `adb -P PORT connect 127.0.0.1:DEVPORT`.
Services: `shell,v2,...:cmd` (shell protocol v2 with exit codes), legacy `shell:cmd` / `exec:cmd`,
and `sync:` (STAT, LIST, SEND, RECV, QUIT). Only `shell_v2` and `fixed_push_mkdir` are advertised,
so the host never uses stat_v2/ls_v2/sendrecv_v2.

Its filesystem is a temp directory `root`: remote absolute paths map to `root/<path>`. Shell commands
run for real on this host with `sh -c` inside `root` (absolute /data, /sdcard, /sys, /system and
/proc/{cpuinfo,meminfo} paths in the command are rewritten into `root`); an aarch64 ELF at a command
position is run under `qemu-aarch64-static`. `getprop` and `dumpsys` are small scripts in
`root/system/bin` that read state files the handset keeps current (battery temperature cools towards
ambient over time and rises with each runner run). `pkill`/`killall` there only match processes in
the sessions this handset started, so a command sent to the fake never signals the host's processes.

Knobs: `extra_props` (e.g. HarmonyOS's hw_sc.build.platform.version), thermal model parameters.
Fault knobs: `unauthorized` (AUTH never accepted), `offline_on_run=N` (drop off the bus during the
Nth `mcpm-run`), `storage_full` (SEND fails with ENOSPC), `runner_fault="crash"|"hang"`, `abi`.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import stat
import struct
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from device_tests.adbd_protocol import Closed, Stream, Transport
from device_tests.fake_sync import serve_sync

QEMU = ["qemu-aarch64-static", "-L", "/usr/aarch64-linux-gnu"]
_ABILISTS = {"arm64-v8a": "arm64-v8a,armeabi-v7a,armeabi", "armeabi-v7a": "armeabi-v7a,armeabi",
             "x86_64": "x86_64,x86"}
_MAPPED = re.compile(r"(?<![\w./~-])/(data|sdcard|sys|system|proc/cpuinfo|proc/meminfo)(?=[/\s;&|)'\"<>]|$)")
_SEGMENT = re.compile(r"(;|&&|\|\||\||\(|\{(?=\s)|\n)")  # command-position boundaries


def is_aarch64_elf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(20)
    except OSError:
        return False
    return len(head) == 20 and head[:4] == b"\x7fELF" and struct.unpack("<H", head[18:20])[0] == 183


class FakeHandset:
    def __init__(self, serial_hint: str = "fake", model: str = "Fake Handset", soc: str = "QEMU-A64",
                 abi: str = "arm64-v8a", unauthorized: bool = False, offline_on_run: int | None = None,
                 storage_full: bool = False, runner_fault: str | None = None,
                 start_temp_c: float = 30.0, ambient_c: float = 28.0, heat_per_run_c: float = 0.0,
                 cool_c_per_s: float = 2.0, cpus: int = 8, root: Path | None = None,
                 extra_props: dict[str, str] | None = None):
        self.root = Path(root or tempfile.mkdtemp(prefix=f"fake-handset-{serial_hint}-"))
        self.abi, self.unauthorized, self.offline_on_run = abi, unauthorized, offline_on_run
        self.storage_full, self.runner_fault = storage_full, runner_fault
        self.temp_c, self.ambient_c, self.heat_per_run_c, self.cool_c_per_s = start_temp_c, ambient_c, heat_per_run_c, cool_c_per_s
        self.runner_runs = 0
        self.commands: list[str] = []  # every shell command received, for tests
        self.services: list[str] = []  # every service the host OPENed
        self.props = {
            "ro.product.manufacturer": "FakeCorp", "ro.product.model": model, "ro.product.name": serial_hint,
            "ro.product.device": serial_hint, "ro.board.platform": "qemu", "ro.soc.manufacturer": "QEMU",
            "ro.soc.model": soc, "ro.product.cpu.abi": abi, "ro.product.cpu.abilist": _ABILISTS.get(abi, abi),
            "ro.build.version.release": "14", "ro.build.version.sdk": "34", "ro.kernel.qemu": "1",
            "ro.serialno": serial_hint, **(extra_props or {}),
        }
        self._cpus = cpus
        self._procs: set[subprocess.Popen] = set()
        self._transports: set[Transport] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._make_fs()

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> "FakeHandset":
        self._listener.listen(4)
        threading.Thread(target=self._accept_loop, daemon=True).start()
        threading.Thread(target=self._thermal_loop, daemon=True).start()
        return self

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def go_offline(self) -> None:
        """Vanish from the bus: stop listening, drop every connection, kill running commands."""
        self._stop.set()
        try:
            self._listener.close()
        except OSError:
            pass
        with self._lock:
            transports, procs = list(self._transports), list(self._procs)
        for t in transports:
            t.shutdown()
        for p in procs:
            _kill(p)

    def stop(self) -> None:
        self.go_offline()
        shutil.rmtree(self.root, ignore_errors=True)

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            banner = "device::" + "".join(f"{k}={self.props[k]};" for k in
                                          ("ro.product.name", "ro.product.model", "ro.product.device"))
            banner += "features=shell_v2,fixed_push_mkdir"
            t = Transport(sock, banner, self._service, authorized=not self.unauthorized)
            with self._lock:
                self._transports.add(t)
            threading.Thread(target=self._serve, args=(t,), daemon=True).start()

    def _serve(self, t: Transport) -> None:
        t.serve()
        with self._lock:
            self._transports.discard(t)

    # ---------------------------------------------------------------- filesystem + state files
    def host_path(self, remote: str) -> Path:
        rel = os.path.normpath("/" + remote).lstrip("/")
        return self.root / rel

    def _make_fs(self) -> None:
        for d in ("data/local/tmp", "sdcard", "system/bin", "proc", ".fake"):
            (self.host_path(d)).mkdir(parents=True, exist_ok=True)
        cpuinfo, freqs = [], []
        for i in range(self._cpus):
            big = i >= self._cpus // 2
            cpuinfo.append(f"processor\t: {i}\nBogoMIPS\t: 38.40\nFeatures\t: fp asimd aes crc32 atomics asimddp\n"
                           f"CPU implementer\t: 0x41\nCPU part\t: {'0xd47' if big else '0xd46'}\n")
            freq = 2800000 if i == self._cpus - 1 else (2400000 if big else 1800000)
            d = self.host_path(f"sys/devices/system/cpu/cpu{i}/cpufreq")
            d.mkdir(parents=True, exist_ok=True)
            (d / "cpuinfo_max_freq").write_text(f"{freq}\n")
            freqs.append(freq)
        self.host_path("proc/cpuinfo").write_text("\n".join(cpuinfo) + "\nHardware\t: QEMU fake handset\n")
        self.host_path("proc/meminfo").write_text("MemTotal:        7812456 kB\nMemFree:         2345678 kB\n"
                                                  "MemAvailable:    4567890 kB\n")
        self.write_props()
        fake = self.root / ".fake"
        _script(self.host_path("system/bin/getprop"), f"""#!/bin/sh
f='{fake}/props'
if [ $# -eq 0 ]; then sed 's/^\\([^=]*\\)=\\(.*\\)$/[\\1]: [\\2]/' "$f"; exit 0; fi
v=$(grep -m1 "^$1=" "$f" | cut -d= -f2-)
if [ -n "$v" ]; then echo "$v"; else echo "${{2:-}}"; fi
""")
        _script(self.host_path("system/bin/dumpsys"), f"""#!/bin/sh
case "$1" in
  battery) cat '{fake}/battery' ;;
  thermalservice) cat '{fake}/thermal' ;;
  *) echo "Can't find service: $1"; exit 0 ;;
esac
""")
        # pkill/killall run on this host: confine them to the sessions this handset started, never the host's
        (fake / "sids").write_text("")
        _script(self.host_path("system/bin/pkill"), f"""#!/bin/sh
sids=$(paste -sd, '{fake}/sids')
[ -n "$sids" ] || exit 1
exec /usr/bin/pkill -s "$sids" "$@"
""")
        _script(self.host_path("system/bin/killall"), f"""#!/bin/sh
exec '{self.root}/system/bin/pkill' -x "$@"
""")
        self._write_thermal()

    def _write_sids(self) -> None:
        (self.root / ".fake" / "sids").write_text("".join(f"{p.pid}\n" for p in self._procs))

    def write_props(self) -> None:
        (self.root / ".fake" / "props").write_text("".join(f"{k}={v}\n" for k, v in self.props.items()))

    def _write_thermal(self) -> None:
        t = self.temp_c
        status = 0 if t < 40 else 1 if t < 43 else 2 if t < 46 else 3
        fake = self.root / ".fake"
        (fake / "battery.tmp").write_text(
            "Current Battery Service state:\n  AC powered: false\n  USB powered: true\n  status: 2\n"
            f"  health: 2\n  present: true\n  level: 87\n  scale: 100\n  voltage: 4211\n"
            f"  temperature: {int(round(t * 10))}\n  technology: Li-ion\n")
        (fake / "thermal.tmp").write_text(
            f"IsStatusOverride: false\nThermalEventListeners:\n\tcallbacks: 0\nThermal Status: {status}\n"
            f"Cached temperatures:\n\tTemperature{{mValue={t:.1f}, mType=2, mName=battery, mStatus={status}}}\n"
            f"HAL Ready: true\nCurrent temperatures from HAL:\n"
            f"\tTemperature{{mValue={t + 4:.1f}, mType=0, mName=cpu0, mStatus={status}}}\n"
            f"\tTemperature{{mValue={t:.1f}, mType=2, mName=battery, mStatus={status}}}\n")
        os.replace(fake / "battery.tmp", fake / "battery")
        os.replace(fake / "thermal.tmp", fake / "thermal")

    def _thermal_loop(self) -> None:
        last = time.monotonic()
        while not self._stop.wait(0.2):
            now = time.monotonic()
            with self._lock:
                self.temp_c = max(self.ambient_c, self.temp_c - self.cool_c_per_s * (now - last))
            last = now
            self._write_thermal()

    # ---------------------------------------------------------------- services
    def _service(self, name: str):
        self.services.append(name)
        if name == "sync:":
            return lambda stream: serve_sync(stream, self.host_path, self.storage_full)
        m = re.match(r"^shell(,[^:]*)?:(.*)$", name, re.S)
        if m:
            args = (m.group(1) or "").split(",")
            cmd = m.group(2)
            if not cmd:  # interactive shells are not offered
                return None
            v2 = "v2" in args
            return lambda stream: self._shell(stream, cmd, v2)
        if name.startswith("exec:"):
            return lambda stream: self._shell(stream, name[5:], False)
        return None

    def _rewrite(self, cmd: str) -> str:
        """Map device paths into the root; prefix aarch64 ELFs at command position with qemu."""
        cmd = _MAPPED.sub(lambda m: str(self.root) + "/" + m.group(1), cmd)
        cwd, out = str(self.root), []
        for part in _SEGMENT.split(cmd):
            words = part.split()
            if words and words[0] == "cd" and len(words) > 1:
                cwd = os.path.normpath(os.path.join(cwd, words[1].strip("'\"")))
            elif words and "/" in words[0] and is_aarch64_elf(Path(os.path.join(cwd, words[0].strip("'\"")))):
                lead = part[:len(part) - len(part.lstrip())]
                part = lead + " ".join(QEMU) + " " + part.lstrip()
            out.append(part)
        return "".join(out)

    def _runner_hook(self, cmd: str) -> str:
        """Count runner invocations (a segment whose program is */mcpm-run) and apply runner faults:
        the faulty program replaces the runner but keeps its redirections."""
        parts = _SEGMENT.split(cmd)
        idx = [i for i, p in enumerate(parts) if p.split() and os.path.basename(p.split()[0]) == "mcpm-run"]
        if not idx:
            return cmd
        with self._lock:
            self.runner_runs += 1
            self.temp_c += self.heat_per_run_c
            n = self.runner_runs
        fault = None
        if self.offline_on_run is not None and n >= self.offline_on_run:
            threading.Timer(0.3, self.go_offline).start()
            fault = "sleep 30"
        elif self.runner_fault == "crash":
            fault = ("echo 'Fatal signal 11 (SIGSEGV), code 1 (SEGV_MAPERR) in tid 4242 (mcpm-run)' >&2; "
                     "kill -SEGV $$")
        elif self.runner_fault == "hang":
            fault = "sleep 3600"
        if fault is None:
            return cmd
        for i in idx:
            m = re.match(r"(\s*)([^<>]*)(.*)$", parts[i], re.S)
            parts[i] = f"{m.group(1)}sh -c {shlex.quote(fault)} {m.group(3)}"
        return "".join(parts)

    def _shell(self, stream: Stream, cmd: str, v2: bool) -> None:
        self.commands.append(cmd)
        real = self._rewrite(self._runner_hook(cmd))
        env = {"PATH": f"{self.root}/system/bin:/usr/local/bin:/usr/bin:/bin", "HOME": str(self.root / "data/local/tmp"),
               "TMPDIR": str(self.root / "data/local/tmp"), "ANDROID_DATA": "/data", "LANG": "C"}
        proc = subprocess.Popen(["sh", "-c", real], cwd=self.root, env=env, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE if v2 else subprocess.STDOUT,
                                start_new_session=True)
        with self._lock:
            self._procs.add(proc)
            self._write_sids()
        root = str(self.root).encode()
        pumps = [threading.Thread(target=_pump, args=(proc.stdout, stream, 1 if v2 else None, root), daemon=True)]
        if v2:
            pumps.append(threading.Thread(target=_pump, args=(proc.stderr, stream, 2, root), daemon=True))
        for t in pumps:
            t.start()
        threading.Thread(target=self._stdin, args=(stream, proc, v2), daemon=True).start()
        try:
            while proc.poll() is None:
                if stream.closed.wait(0.1):  # host hung up (client killed, device offline)
                    _kill(proc)
            for t in pumps:
                t.join()
            code = proc.returncode if proc.returncode >= 0 else 128 - proc.returncode
            if v2 and not stream.closed.is_set():
                stream.write(b"\x03" + struct.pack("<I", 1) + bytes([code & 0xFF]))
        finally:
            _kill(proc)
            with self._lock:
                self._procs.discard(proc)
                self._write_sids()

    def _stdin(self, stream: Stream, proc: subprocess.Popen, v2: bool) -> None:
        try:
            while True:
                if not v2:
                    data = stream.read()
                    if not data:
                        break
                    proc.stdin.write(data)
                    proc.stdin.flush()
                    continue
                pid, length = struct.unpack("<BI", stream.read_exact(5))
                data = stream.read_exact(length)
                if pid == 0:
                    proc.stdin.write(data)
                    proc.stdin.flush()
                elif pid == 4:
                    break
        except (Closed, OSError, ValueError):
            pass
        try:
            proc.stdin.close()
        except OSError:
            pass

def _pump(pipe, stream: Stream, packet_id: int | None, root: bytes) -> None:
    try:
        while chunk := pipe.read1(64 * 1024):
            chunk = chunk.replace(root, b"")  # show device paths, not host paths
            if packet_id is None:
                stream.write(chunk)
            else:
                stream.write(bytes([packet_id]) + struct.pack("<I", len(chunk)) + chunk)
    except (Closed, OSError, ValueError):
        pass


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            pass
        proc.wait()


def _script(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o755)
    assert stat.S_IMODE(path.stat().st_mode) & 0o111


def main() -> None:
    """`python -m device_tests.fake_handset [--abi A] [--runner-fault crash|hang] ...`: serve until Ctrl-C."""
    import argparse

    ap = argparse.ArgumentParser(description="A fake adb handset on loopback (then: adb connect ADDRESS).")
    ap.add_argument("--model", default="Fake Handset")
    ap.add_argument("--abi", default="arm64-v8a", choices=sorted(_ABILISTS))
    ap.add_argument("--unauthorized", action="store_true")
    ap.add_argument("--storage-full", action="store_true")
    ap.add_argument("--runner-fault", choices=["crash", "hang"])
    ap.add_argument("--offline-on-run", type=int)
    args = ap.parse_args()
    handset = FakeHandset(model=args.model, abi=args.abi, unauthorized=args.unauthorized,
                          storage_full=args.storage_full, runner_fault=args.runner_fault,
                          offline_on_run=args.offline_on_run).start()
    signal.signal(signal.SIGTERM, lambda *_: handset._stop.set())
    print(f"fake handset at {handset.address} (root {handset.root}); adb connect {handset.address}", flush=True)
    try:
        while not handset._stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        handset.stop()


if __name__ == "__main__":
    main()
