"""Per-SoC CPU presets for the aarch64 build (``--soc``): LLVM mcpu/mattr of the SoC's big cores.

Code built for a preset only runs on cores that have its features; "generic" (ARMv8.0-A + NEON) runs
on every 64-bit Android/HarmonyOS phone. dotprod (sdot/udot, ARMv8.2+) and i8mm (ARMv8.6+/v9)
are what the int4 kernels profit from.
"""
from __future__ import annotations

from dataclasses import dataclass

from exporter.errors import ExportError


@dataclass(frozen=True)
class SocPreset:
    name: str
    mcpu: str
    mattr: tuple[str, ...]
    note: str

    def llvm_target(self, triple: str) -> dict:
        return {"kind": "llvm", "mtriple": triple, "mcpu": self.mcpu, "mattr": list(self.mattr)}


_V82 = ("+neon", "+fp-armv8", "+fullfp16", "+dotprod")
_V9 = _V82 + ("+i8mm", "+bf16")

# name                  mcpu           mattr   big core / SoC family
PRESETS: dict[str, SocPreset] = {p.name: p for p in [
    SocPreset("generic",       "generic",     ("+neon",), "any ARMv8-A phone (safe default)"),
    SocPreset("armv8.2",       "cortex-a55",  _V82, "any ARMv8.2-A core with dotprod (2018+ phones)"),
    # Qualcomm Snapdragon
    SocPreset("sd855",         "cortex-a76",  _V82, "Snapdragon 855/860: Kryo 485 (Cortex-A76)"),
    SocPreset("sd865",         "cortex-a77",  _V82, "Snapdragon 865/870: Kryo 585 (Cortex-A77)"),
    SocPreset("sd888",         "cortex-x1",   _V82, "Snapdragon 888: Cortex-X1"),
    SocPreset("sd8gen1",       "cortex-x2",   _V9,  "Snapdragon 8 Gen 1 / 8+ Gen 1: Cortex-X2 (ARMv9)"),
    SocPreset("sd8gen2",       "cortex-x3",   _V9,  "Snapdragon 8 Gen 2: Cortex-X3"),
    SocPreset("sd8gen3",       "cortex-x4",   _V9,  "Snapdragon 8 Gen 3: Cortex-X4"),
    SocPreset("sd7gen1",       "cortex-a710", _V9,  "Snapdragon 7 Gen 1: Cortex-A710"),
    # MediaTek Dimensity
    SocPreset("dimensity1200", "cortex-a78",  _V82, "Dimensity 1100/1200: Cortex-A78"),
    SocPreset("dimensity8100", "cortex-a78",  _V82, "Dimensity 8100/8200: Cortex-A78"),
    SocPreset("dimensity9000", "cortex-x2",   _V9,  "Dimensity 9000: Cortex-X2"),
    SocPreset("dimensity9200", "cortex-x3",   _V9,  "Dimensity 9200: Cortex-X3"),
    SocPreset("dimensity9300", "cortex-x4",   _V9,  "Dimensity 9300: Cortex-X4"),
    # HiSilicon Kirin (Huawei; HarmonyOS devices)
    SocPreset("kirin990",      "cortex-a76",  _V82, "Kirin 990: Cortex-A76"),
    SocPreset("kirin9000",     "cortex-a77",  _V82, "Kirin 9000: Cortex-A77"),
    SocPreset("kirin9000s",    "cortex-a76",  _V82, "Kirin 9000S/9010: TaiShan V120 (ARMv8.2 + dotprod, tuned as A76)"),
]}


def get_preset(name: str) -> SocPreset:
    if name not in PRESETS:
        raise ExportError(f"--soc: unknown SoC preset '{name}' (known: {', '.join(PRESETS)})")
    return PRESETS[name]
