"""The aarch64 int4 kernels modelled with llvm-mca (no phone here), against llama.cpp's NEON Q4_0 kernels.

    python3 bench/arm_kernels.py [--mca llvm-mca-19] [--cpus neoverse-n1,cortex-x2,neoverse-v2] [--json]

Compiles, with the same clang and flags for both (-O3, -march=armv8.2-a+dotprod, and
armv8.6-a+dotprod+i8mm for the i8mm kernels):
  ours      targets/tvm/microkernels/q4_neon.c: the decode GEMV (rows2_dot: 2 rows x 1 token, 4 groups per
            step) and the prefill GEMM tile (4 rows x 8 tokens: tile_sdot, with i8mm tile_mmla), each behind
            a noinline wrapper so that its inner loop stands alone in the assembly
  llama.cpp the llama-cpp-python sdist bench/decode_host.py builds (read from ~/.cache, never copied into
            this project): ggml_vec_dot_q4_0_q8_0 (arch/arm/quants.c), the repacked Q4_0x4 kernels
            ggml_gemv/gemm_q4_0_4x4_q8_0 (dotprod) and ggml_gemv/gemm_q4_0_4x8_q8_0 (i8mm) (arch/arm/repack.cpp)
then takes each kernel's hot loop (from llvm-objdump of the object: llama.cpp writes sdot as `.inst` words) (the innermost loop with the most int8 multiply-adds), runs llvm-mca
on it per core, and reports cycles per iteration (llvm-mca's total cycles / iterations: throughput and
loop-carried dependencies, all loads L1 hits) divided by the iteration's 32-weight block-dots (int8
multiply-adds / 32: sdot = 16, smmla = 32), i.e. cycles per 32 weights x 1 token.
Also a roofline per SoC preset (targets/tvm/presets.py): bytes one decoded token of the 2B shape reads
(q4f16 weights + scales + fp16 KV at 1024 tokens) over the SoC's published peak DRAM bandwidth.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

MK = ROOT / "targets" / "tvm" / "microkernels"
DOTPROD, I8MM = "armv8.2-a+dotprod+fp16", "armv8.6-a+dotprod+i8mm+fp16"
FLAGS = ["--target=aarch64-linux-gnu", "-O3", "-fno-math-errno", "-c", "-DNDEBUG"]
# Wrappers keeping our inner loops out of the row/token bookkeeping (compiled with q4_matmul.c, which
# includes q4_neon.c).
OURS_DRIVER = """
#include "q4_matmul.c"
__attribute__((noinline)) void mca_gemv(const uint8_t* w, int64_t ws, const uint16_t* s, const int8_t* xq,
                                        const int32_t* nb, const float* xd, int64_t G, float* out) {
  rows2_dot(w, ws, s, G, xq, nb, xd, out);
}
__attribute__((noinline)) void mca_gemm(const uint8_t* w, const uint16_t* s, int64_t G, const int8_t* xq,
                                        const int32_t* nb, const float* xd, int64_t k, float* out, int64_t os) {
  GEMM_TILE(4, 2, w, k / 2, s, G, xq, nb, xd, k, out, os);
}
"""
# (label, source, function, -march, role)
KERNELS = [
    ("mcpm decode GEMV (rows2_dot)", "ours", "mca_gemv", DOTPROD, "gemv"),
    ("llama.cpp ggml_vec_dot_q4_0_q8_0", "quants.c", "ggml_vec_dot_q4_0_q8_0", DOTPROD, "gemv"),
    ("llama.cpp ggml_gemv_q4_0_4x4_q8_0 (repacked)", "repack.cpp", "ggml_gemv_q4_0_4x4_q8_0", DOTPROD, "gemv"),
    ("mcpm prefill GEMM tile 4x8 (tile_sdot)", "ours", "mca_gemm", DOTPROD, "gemm"),
    ("llama.cpp ggml_gemm_q4_0_4x4_q8_0 (repacked)", "repack.cpp", "ggml_gemm_q4_0_4x4_q8_0", DOTPROD, "gemm"),
    ("mcpm decode GEMV, i8mm build", "ours", "mca_gemv", I8MM, "gemv"),
    ("llama.cpp ggml_gemv_q4_0_4x8_q8_0 (repacked, i8mm build)", "repack.cpp", "ggml_gemv_q4_0_4x8_q8_0", I8MM, "gemv"),
    ("mcpm prefill GEMM tile 4x8 smmla (tile_mmla)", "ours", "mca_gemm", I8MM, "gemm"),
    ("llama.cpp ggml_gemm_q4_0_4x8_q8_0 (repacked, i8mm)", "repack.cpp", "ggml_gemm_q4_0_4x8_q8_0", I8MM, "gemm"),
]
# Published LPDDR type and data rate of each SoC preset's memory (64-bit bus): peak GB/s, not sustained.
SOC_BANDWIDTH = {
    "sd855": ("LPDDR4X-4266", 34.1), "sd865": ("LPDDR5-5500", 44.0), "sd888": ("LPDDR5-6400", 51.2),
    "sd8gen1": ("LPDDR5-6400", 51.2), "sd8gen2": ("LPDDR5X-8533", 68.3), "sd8gen3": ("LPDDR5X-9600", 76.8),
    "sd7gen1": ("LPDDR5-6400", 51.2), "dimensity1200": ("LPDDR4X-4266", 34.1),
    "dimensity8100": ("LPDDR5-6400", 51.2), "dimensity9000": ("LPDDR5X-7500", 60.0),
    "dimensity9200": ("LPDDR5X-8533", 68.3), "dimensity9300": ("LPDDR5T-9600", 76.8),
    "kirin990": ("LPDDR4X-4266", 34.1), "kirin9000": ("LPDDR5-5500", 44.0),
}
_INSN = re.compile(r"^\s*([0-9a-f]+):\s+(\S+)\s*(.*?)\s*$")
_TARGET = re.compile(r"(?:0x)?([0-9a-f]+) <[^>]*>$")
BRANCHES = ("b", "cbz", "cbnz", "tbz", "tbnz")


def macs(insts: list[str]) -> int:
    """int8 multiply-adds of an instruction sequence (sdot/udot/usdot: 16 each, smmla/ummla/usmmla: 32)."""
    n = 0
    for ln in insts:
        op = ln.split()[0] if ln.split() else ""
        n += 16 if op in ("sdot", "udot", "usdot") else 32 if op in ("smmla", "ummla", "usmmla") else 0
    return n


def disassemble(obj: Path, name: str, objdump: str) -> list[tuple[int, str]]:
    """(address, instruction) of function ``name`` (llvm-objdump: also decodes llama.cpp's `.inst` words)."""
    out = subprocess.run([objdump, "-d", "--no-show-raw-insn", f"--disassemble-symbols={name}", str(obj)],
                         capture_output=True, text=True, check=True).stdout
    insts = [(int(m.group(1), 16), f"{m.group(2)} {m.group(3)}".strip()) for ln in out.splitlines()
             if (m := _INSN.match(ln))]
    if not insts:
        raise SystemExit(f"arm_kernels: {name} not found in {obj.name}")
    return insts


def hot_loop(code: list[tuple[int, str]], name: str) -> list[str]:
    """The innermost loop (target .. backward branch, no other backward branch inside) with the most
    multiply-adds, as llvm-mca input: branch targets replaced by a label at the loop head."""
    loops = []
    for i, (addr, text) in enumerate(code):
        op = text.split()[0]
        m = _TARGET.search(text)
        if (op in BRANCHES or op.startswith("b.")) and m and int(m.group(1), 16) <= addr:
            j = next((j for j, (a, _) in enumerate(code) if a == int(m.group(1), 16)), None)
            if j is not None:
                loops.append((j, i))
    inner = [(j, i) for j, i in loops if not any((j, i) != (j2, i2) and j <= j2 and i2 <= i for j2, i2 in loops)]
    body = lambda j, i: [t for _, t in code[j:i + 1]]  # noqa: E731
    best = max(inner, key=lambda ji: macs(body(*ji)), default=None)
    if best is None or macs(body(*best)) == 0:
        raise SystemExit(f"arm_kernels: no multiply-add loop found in {name}")
    return [".Lloop:"] + [_TARGET.sub(".Lloop", t.replace(" 0x", " ")) if _TARGET.search(t) else t
                          for t in body(*best)]


def compile_obj(src: Path, march: str, includes: list[Path], tmp: Path) -> Path:
    out = tmp / (src.stem + "-" + march.replace("+", "_") + ".o")
    cxx = src.suffix == ".cpp"
    cmd = ["clang++" if cxx else "clang", *FLAGS, f"-march={march}", *[f"-I{p}" for p in includes],
           *(["-std=c++17"] if cxx else []), str(src), "-o", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"arm_kernels: {' '.join(cmd)}: {proc.stderr.strip().splitlines()[-1:]}")
    return out


def mca_cycles(insts: list[str], mca: str, cpu: str, march: str, tmp: Path) -> tuple[float, float]:
    """(cycles per iteration, block reciprocal throughput) of the loop on ``cpu``."""
    f = tmp / "loop.s"
    f.write_text("\n".join(insts) + "\n")
    attrs = ",".join("+" + a for a in march.split("+")[1:])
    out = subprocess.run([mca, "-mtriple=aarch64", f"-mcpu={cpu}", f"-mattr={attrs}", "-iterations=200", str(f)],
                         capture_output=True, text=True, check=True).stdout
    total = float(re.search(r"Total Cycles:\s+(\d+)", out).group(1))
    rthr = float(re.search(r"Block RThroughput:\s+([\d.]+)", out).group(1))
    return total / 200, rthr


def sched_model(mca: str, cpu: str) -> str:
    """Name of the scheduling model llvm-mca uses for ``cpu`` (its first resource's prefix)."""
    f = Path(tempfile.mkstemp(suffix=".s")[1])
    f.write_text("add x0, x0, x1\n")
    out = subprocess.run([mca, "-mtriple=aarch64", f"-mcpu={cpu}", str(f)], capture_output=True, text=True).stdout
    f.unlink()
    m = re.search(r"Resources:\n\[0\]\s+- (\w+?)Unit", out) or re.search(r"Resources:\n\[[\d.]+\]\s+- (\w+)", out)
    return m.group(1) if m else "?"


def roofline() -> list[dict]:
    from make_2b_checkpoint import CONFIG_2B

    from exporter.config import MiniCPMConfig
    from targets.tvm.model import kv_cache_bytes
    from targets.tvm.presets import PRESETS

    cfg = MiniCPMConfig.from_hf(CONFIG_2B)
    h, i, L, v = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    linear = L * (h * (3 * h) + h * h + h * 2 * i + i * h) + v * h          # tied head read, embedding gathered
    weights = linear // 2 + linear // 32 * 2                                  # int4 + fp16 scale per 32
    per_tok = weights + kv_cache_bytes(cfg, 1024)
    rows = []
    for name, (mem, gbs) in SOC_BANDWIDTH.items():
        p = PRESETS[name]
        rows.append({"soc": name, "core": p.mcpu, "memory": mem, "peak_gb_s": gbs,
                     "bytes_per_token": per_tok, "roofline_tok_s": round(gbs * 1e9 / per_tok, 1)})
    return rows


def main(argv=None) -> dict:
    from host_engines import llama_sdist, llama_vendor

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mca", default=next((m for m in ("llvm-mca-19", "llvm-mca-18", "llvm-mca-17", "llvm-mca")
                                           if shutil.which(m)), "llvm-mca"))
    ap.add_argument("--objdump", default=next((m for m in ("llvm-objdump-19", "llvm-objdump") if shutil.which(m)),
                                              "llvm-objdump"))
    # LLVM 19's models: Neoverse N1 (the Cortex-A76 design; -mcpu=cortex-a76 itself gets the Cortex-A57
    # model), Cortex-X2 (Neoverse N2 model), Neoverse V2 (the Cortex-X3 design, the newest Cortex-X class)
    ap.add_argument("--cpus", default="neoverse-n1,cortex-x2,neoverse-v2")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    vendor = llama_vendor()
    if not vendor.exists():
        sdist = llama_sdist()
        if not sdist.exists():
            raise SystemExit("arm_kernels: no llama-cpp-python sdist; run bench/decode_host.py --engines llama.cpp once")
        vendor.parent.parent.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["tar", "xzf", str(sdist), "-C", str(vendor.parent.parent.parent)], check=True)
    arm = vendor / "ggml" / "src" / "ggml-cpu" / "arch" / "arm"
    inc = [vendor / "ggml" / "include", vendor / "ggml" / "src", vendor / "ggml" / "src" / "ggml-cpu"]
    cpus = [c for c in args.cpus.split(",") if c]
    ver = subprocess.run([args.mca, "--version"], capture_output=True, text=True).stdout
    res = {"mca": next((ln.strip() for ln in ver.splitlines() if "version" in ln), args.mca),
           "clang_flags": FLAGS, "models": {c: sched_model(args.mca, c) for c in cpus}, "kernels": [],
           "roofline": roofline()}
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        (tmp / "ours.c").write_text(OURS_DRIVER)
        objs = {}
        for label, src, fn, march, role in KERNELS:
            key = (src, march)
            if key not in objs:
                path = tmp / "ours.c" if src == "ours" else arm / src
                objs[key] = compile_obj(path, march, [MK] if src == "ours" else inc, tmp)
            loop = hot_loop(disassemble(objs[key], fn, args.objdump), fn)
            blocks = macs(loop) / 32
            row = {"kernel": label, "role": role, "march": march, "loop_instructions": len(loop) - 1,
                   "block_dots_per_iteration": blocks, "cycles_per_block": {}}
            for cpu in cpus:
                cyc, rthr = mca_cycles(loop, args.mca, cpu, march, tmp)
                row["cycles_per_block"][cpu] = round(cyc / blocks, 3)
            res["kernels"].append(row)
    if args.json:
        print(json.dumps(res))
    else:
        print(f"{res['mca']}; scheduling models: " + ", ".join(f"{c} -> {m}" for c, m in res["models"].items()))
        print("| kernel | -march | loop insts | 32-weight block-dots / iter | " + " | ".join(cpus) + " |")
        print("|---" * (4 + len(cpus)) + "|")
        for r in res["kernels"]:
            print(f"| {r['kernel']} | {r['march']} | {r['loop_instructions']} | {r['block_dots_per_iteration']:g} | "
                  + " | ".join(f"{r['cycles_per_block'][c]:.3f}" for c in cpus) + " |")
        print("\n| SoC preset | big core | memory | peak GB/s | GB per token (2B, q4f16, fp16 KV @1024) | roofline tok/s |")
        print("|---|---|---|---|---|---|")
        for r in res["roofline"]:
            print(f"| {r['soc']} | {r['core']} | {r['memory']} | {r['peak_gb_s']} | {r['bytes_per_token'] / 1e9:.3f} | "
                  f"{r['roofline_tok_s']} |")
    return res


if __name__ == "__main__":
    main()
