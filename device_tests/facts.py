"""Device facts and thermals from one shell command each, and the ABI of a bundle's runner binary."""
from __future__ import annotations

import re
import struct
from pathlib import Path

from exporter.errors import ExportError

_SEP = "@@mcpm@@"
FACTS_COMMAND = (
    f"getprop; echo {_SEP}cpuinfo; cat /proc/cpuinfo; echo {_SEP}meminfo; cat /proc/meminfo; "
    f"echo {_SEP}cpufreq; for f in /sys/devices/system/cpu/cpu[0-9]*/cpufreq/cpuinfo_max_freq; "
    f"do echo \"$f $(cat $f 2>/dev/null)\"; done; true"
)
THERMAL_COMMAND = f"dumpsys battery 2>/dev/null; echo {_SEP}thermal; dumpsys thermalservice 2>/dev/null; true"

_ELF_MACHINES = {183: "arm64-v8a", 40: "armeabi-v7a", 62: "x86_64", 3: "x86"}


def bundle_abi(binary: Path) -> str:
    """Android ABI name of an ELF executable, from its e_machine field."""
    head = Path(binary).read_bytes()[:20]
    if len(head) < 20 or head[:4] != b"\x7fELF":
        raise ExportError(f"{binary} is not an ELF executable (the on-device runner must be one)")
    machine = struct.unpack("<H", head[18:20])[0]
    if machine not in _ELF_MACHINES:
        raise ExportError(f"{binary} is built for unknown ELF machine {machine}")
    return _ELF_MACHINES[machine]


def _sections(text: str) -> dict[str, str]:
    parts = text.split(_SEP)
    out = {"props": parts[0]}
    for part in parts[1:]:
        name, _, body = part.partition("\n")
        out[name.strip()] = body
    return out


def parse_facts(text: str) -> dict:
    sec = _sections(text)
    props = dict(re.findall(r"^\[([^\]]+)\]: \[(.*)\]\s*$", sec.get("props", ""), re.M))
    harmony = props.get("hw_sc.build.platform.version") or props.get("ro.build.version.harmony")
    android = props.get("ro.build.version.release", "?")
    os_name = f"HarmonyOS {harmony} (Android {android} base)" if harmony else \
        f"Android {android} (SDK {props.get('ro.build.version.sdk', '?')})"
    cores = len(re.findall(r"^processor\s*:", sec.get("cpuinfo", ""), re.M))
    freqs = [int(m) for m in re.findall(r"cpuinfo_max_freq (\d+)", sec.get("cpufreq", ""))]
    mem = re.search(r"^MemTotal:\s+(\d+)\s*kB", sec.get("meminfo", ""), re.M)
    abilist = [a for a in props.get("ro.product.cpu.abilist", "").split(",") if a]
    return {
        "manufacturer": props.get("ro.product.manufacturer"),
        "model": props.get("ro.product.model"),
        "board_platform": props.get("ro.board.platform"),
        "soc_model": props.get("ro.soc.model") or props.get("ro.hardware.chipname") or props.get("ro.board.platform"),
        "soc_manufacturer": props.get("ro.soc.manufacturer"),
        "abi": props.get("ro.product.cpu.abi"),
        "abilist": abilist or [props.get("ro.product.cpu.abi")],
        "os": os_name,
        "android_release": android,
        "sdk": props.get("ro.build.version.sdk"),
        "harmonyos_version": harmony,
        "cpu_cores": cores or len(freqs) or None,
        "cpu_max_freq_khz": freqs,
        "mem_total_kb": int(mem.group(1)) if mem else None,
        # the Android emulator (and the fake handset) set ro.kernel.qemu: its timings are not a phone's
        "emulated": props.get("ro.kernel.qemu") == "1" or props.get("ro.boot.qemu") == "1",
    }


def parse_thermals(text: str) -> dict:
    sec = _sections(text)
    temp = re.search(r"^\s*temperature:\s*(-?\d+)", sec.get("props", ""), re.M)  # tenths of a degree
    status = re.search(r"Thermal Status:\s*(\d+)", sec.get("thermal", ""))
    return {"battery_c": int(temp.group(1)) / 10 if temp else None,
            "thermal_status": int(status.group(1)) if status else None}
