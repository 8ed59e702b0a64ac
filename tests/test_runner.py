"""The on-device runner `mcpm-run` (runner/): real aarch64 cross build, run under qemu-aarch64-static.

Numbers: on the dev model (runner/devmodel.py) the runner's greedy tokens equal a float64 numpy
reference exactly (every reference step has a top-1/top-2 margin > 1e-3, asserted, far above the
fp32 error) and its logits (--logits-out) are within 1e-4 of it. The real `tiny` bundle test (slow)
states its own bound.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest

from device_tests.facts import bundle_abi
from exporter.bundle import sha256_file
from runner import build, devmodel

QEMU = "qemu-aarch64-static"
pytestmark = pytest.mark.skipif(
    not (shutil.which(QEMU) and shutil.which("aarch64-linux-gnu-g++")),
    reason="needs qemu-aarch64-static and g++-aarch64-linux-gnu")


@pytest.fixture(scope="module")
def runner_dir() -> Path:
    return build.build_runner()  # cached under $MCPM_EXPORT_CACHE/runner (exporter/cache.py)


@pytest.fixture(scope="module")
def dev_bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("dev-bundle")
    params = devmodel.build_bundle(out)
    return out, params


@pytest.fixture(scope="module")
def dev_syslib_bundle(tmp_path_factory):
    """The same model as a TVM system library (symbols under a prefix), as the android target builds it."""
    out = tmp_path_factory.mktemp("dev-syslib-bundle")
    params = devmodel.build_bundle(out, prefix="mcpm_dev_")
    return out, params


def run(runner: Path, *args, timeout=900) -> subprocess.CompletedProcess:
    # the launcher is a static aarch64 ELF; qemu runs it (and, via its ENOEXEC fallback, the loader)
    return subprocess.run([QEMU, str(runner / "mcpm-run"), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout)


def run_json(runner: Path, *args) -> dict:
    proc = run(runner, *args)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout
    return json.loads(lines[0])


def reference(params, prompt: list[int], gen_len: int) -> list[int]:
    ids, out = list(prompt), []
    for _ in range(gen_len):
        logits = devmodel._forward(params, ids)
        top2 = np.sort(logits)[-2:]
        assert top2[1] - top2[0] > 1e-3, "reference too close to a tie for an exact token comparison"
        out.append(int(np.argmax(logits)))
        ids.append(out[-1])
    return out


def synthetic_prompt(n: int, vocab: int, bos: int = 1) -> list[int]:
    """The runner's --prompt-len prompt (documented in runner/README.md)."""
    return [bos] + [3 + (i * 37) % (vocab - 3) for i in range(1, n)]


def program_headers(elf: Path) -> list[tuple[int, int]]:
    """(p_type, p_align) of every program header of a little-endian ELF64 file."""
    data = elf.read_bytes()
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    return [(struct.unpack_from("<I", data, phoff + i * phentsize)[0],
             struct.unpack_from("<Q", data, phoff + i * phentsize + 0x30)[0]) for i in range(phnum)]


def test_layout_abi_and_version(runner_dir):
    info = json.loads((runner_dir / "BUILD.json").read_text())
    for rel, digest in info["files"].items():
        assert sha256_file(runner_dir / rel) == digest, rel
    assert bundle_abi(runner_dir / "mcpm-run") == "arm64-v8a"
    assert bundle_abi(runner_dir / "mcpm-run.bin") == "arm64-v8a"
    assert all(t != 3 for t, _ in program_headers(runner_dir / "mcpm-run")), \
        "the launcher must be static (no PT_INTERP: there is no glibc loader on the phone)"
    for lib in build.SYSROOT_LIBS + ("libtvm_runtime.so", "libtvm_ffi.so"):
        assert (runner_dir / "lib" / lib).is_file(), lib
    for elf in [runner_dir / "mcpm-run", runner_dir / "mcpm-run.bin", *(runner_dir / "lib").iterdir()]:
        loads = [align for t, align in program_headers(elf) if t == 1]
        assert loads and min(loads) >= 16384, f"{elf.name}: PT_LOAD alignment {loads} breaks 16 KB-page phones"
    proc = run(runner_dir, "--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"mcpm-run {info['runner_version']}"


def test_build_cached_and_byte_identical(runner_dir, tmp_path):
    msgs = []
    assert build.build_runner(say=msgs.append) == runner_dir
    assert msgs == [f"cached build {runner_dir}"]
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "wheels").symlink_to(runner_dir.parent / "wheels")
    again = build.build_runner(cache, force=True, say=msgs.append)
    assert again.name == runner_dir.name  # same inputs -> same key
    a = sorted(p.relative_to(runner_dir) for p in runner_dir.rglob("*"))
    b = sorted(p.relative_to(again) for p in again.rglob("*"))
    assert a == b
    for rel in a:
        if (runner_dir / rel).is_file():
            assert (runner_dir / rel).read_bytes() == (again / rel).read_bytes(), rel


@pytest.mark.parametrize("kind", ["shared library", "system library"])
def test_tokens_match_reference(runner_dir, kind, request, tmp_path):
    bundle, params = request.getfixturevalue("dev_bundle" if kind == "shared library" else "dev_syslib_bundle")
    prompt = [5, 17, 99, 3, 42, 200, 7]
    out = run_json(runner_dir, "--bundle", bundle, "--prompt-ids", ",".join(map(str, prompt)),
                   "--gen-len", 10, "--threads", 2, "--logits-out", tmp_path / "logits.bin")
    assert out["tokens"] == reference(params, prompt, 10)
    logits = np.fromfile(tmp_path / "logits.bin", dtype="<f4").reshape(10, devmodel.VOCAB)
    for i, row in enumerate(logits):  # fp32 on aarch64 vs float64 numpy: measured ~3e-7
        np.testing.assert_allclose(row, devmodel._forward(params, prompt + out["tokens"][:i]), atol=1e-4)
    assert out["prompt_len"] == 7 and out["gen_len"] == 10 and out["decode_steps"] == 9
    assert out["threads"] == 2 and out["device"] == "cpu"
    assert out["runner_version"].startswith("0.1.0+")
    for key in ("load_ms", "ttft_ms", "prefill_tok_s", "decode_tok_s"):
        assert out[key] > 0, key
    assert out["peak_rss_kb"] > 1000


def test_chunked_prefill_synthetic_prompt(runner_dir, dev_bundle):
    bundle, params = dev_bundle
    cfg = json.loads((bundle / "mlc-chat-config.json").read_text())
    n = cfg["prefill_chunk_size"] + 22  # two prefill chunks
    out = run_json(runner_dir, "--bundle", bundle, "--prompt-len", n, "--gen-len", 4, "--threads", 1)
    assert out["prompt_len"] == n and out["threads"] == 1
    assert out["tokens"] == reference(params, synthetic_prompt(n, cfg["vocab_size"]), 4)


def _break(bundle: Path, how: str) -> None:
    if how == "truncated shard":
        shard = bundle / "params_shard_0.bin"
        shard.write_bytes(shard.read_bytes()[:1000])
    elif how == "missing shard":
        (bundle / "params_shard_0.bin").unlink()
    elif how == "missing index":
        (bundle / "tensor-cache.json").unlink()
    elif how == "bad config":
        (bundle / "mlc-chat-config.json").write_text("{")
    elif how == "not a library":
        (bundle / "lib" / "model.so").write_text("garbage")
    elif how == "no library":
        (bundle / "lib" / "model.so").unlink()


@pytest.mark.parametrize("how, args, expect", [
    ("truncated shard", [], "params_shard_0.bin is 1000 bytes"),
    ("missing shard", [], "parameter shard missing: {b}/params_shard_0.bin"),
    ("missing index", [], "parameter index not found: {b}/tensor-cache.json"),
    ("bad config", [], "bundle config is not a JSON object: {b}/mlc-chat-config.json"),
    ("not a library", [], "cannot load model library {b}/lib/model.so"),
    ("no library", [], "no model library for device cpu in bundle {b}"),
    (None, ["--lib", "/nonexistent/model.so"], "model library not found: /nonexistent/model.so"),
    (None, ["--prompt-ids", "3,999"], "prompt token id 999 >= vocab_size 256"),
    (None, ["--gen-len", "600"], "exceeds context_window_size 512"),
    (None, ["--device", "opencl"], "--device opencl: this TVM runtime was built without OpenCL"),
    (None, ["--frobnicate", "1"], "unknown argument '--frobnicate'"),
    (None, ["--gen-len", "0"], "--gen-len expects an integer >= 1, got '0'"),
])
def test_bad_input_one_error_line(runner_dir, dev_bundle, tmp_path, how, args, expect):
    b = tmp_path / "bundle"
    shutil.copytree(dev_bundle[0], b)
    if how:
        _break(b, how)
    if "--prompt-ids" not in args:
        args = ["--prompt-len", "4", *args]
    proc = run(runner_dir, "--bundle", b, *args)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mcpm-run: error: "), proc.stderr
    assert expect.format(b=b) in lines[0]
    assert proc.stdout == ""


def test_missing_bundle_and_prompt(runner_dir, tmp_path):
    for args, expect in [(["--bundle", tmp_path / "nope", "--prompt-len", 3], "bundle directory not found"),
                         (["--bundle", tmp_path], "give exactly one of --prompt, --prompt-file, --prompt-ids or --prompt-len")]:
        proc = run(runner_dir, *args)
        assert proc.returncode == 1 and expect in proc.stderr and len(proc.stderr.splitlines()) == 1


def test_install_runner(runner_dir, tmp_path):
    keys = build.install_runner(tmp_path)
    info = json.loads((runner_dir / "BUILD.json").read_text())
    assert keys["runner"]["version"] == info["runner_version"]
    for rel in info["files"]:
        src, dst = runner_dir / rel, tmp_path / "runner" / rel
        assert dst.read_bytes() == src.read_bytes(), rel
        assert os.access(dst, os.X_OK) == os.access(src, os.X_OK), rel
    assert os.access(tmp_path / "runner" / "mcpm-run", os.X_OK)


def test_launcher_restores_loader_mode(runner_dir, tmp_path):
    """A copy that lost its mode bits (zip, some sync tools) still starts: the launcher chmods the loader."""
    copy = tmp_path / "runner"
    build.copy_runner(runner_dir, copy)
    (copy / "lib" / "ld-linux-aarch64.so.1").chmod(0o644)
    proc = run(copy, "--version")
    assert proc.returncode == 0 and proc.stdout.startswith("mcpm-run 0.1.0+"), proc.stderr
    assert os.access(copy / "lib" / "ld-linux-aarch64.so.1", os.X_OK)


def test_bench_harness_on_fake_handset(runner_dir, dev_bundle, adb_server, fake_handset, tmp_path):
    """device_tests' harness pushes the bundle over real adb and runs the real runner on a fake handset."""
    from rich.console import Console

    from device_tests.harness import BenchConfig, bench, failures
    from device_tests.testing import write_test_manifest

    bundle = tmp_path / "dev-android"
    shutil.copytree(dev_bundle[0], bundle)
    build.copy_runner(runner_dir, bundle / "runner")
    write_test_manifest(bundle, {"recipe": "dev", "target": "android", "quantization": {"scheme": "f32"}})
    _, serial = fake_handset()
    cfg = BenchConfig(prompt_len=24, gen_len=6, repeat=1, warmup=0, threads=2)
    report, _ = bench(bundle, tmp_path / "out", serials=[serial], cfg=cfg, adb_port=adb_server.port,
                      console=Console(record=True, width=160))
    assert failures(report) == []
    h = report["handsets"][0]
    assert h["tokens"] == reference(dev_bundle[1], synthetic_prompt(24, devmodel.VOCAB), 6)
    assert h["trials"][0]["runner_version"].startswith("0.1.0+")


@pytest.mark.slow
def test_tiny_android_bundle_matches_host_and_pytorch(runner_dir, tmp_path):
    """The real `tiny` android bundle (system library, int4 microkernels) under qemu vs the PyTorch int4
    reference and the host build (`mcpm-export run`).

    The int4 kernels quantize activations to int8, so aarch64 and x86_64 builds are not bit-identical
    (tiny fp32 differences flip int8 roundings): measured runner-vs-PyTorch logit error 0.07-0.15.
    Bound: the manifest's verification.logit_atol (the export's own host-vs-PyTorch contract). Teacher
    forced on the runner's tokens, every step's logits must be within it, and wherever the reference's
    top-2 margin exceeds 2 * atol the runner's token must be the reference's (and the host's, up to
    the first near-tie of the host)."""
    import torch

    from exporter import api
    from exporter.parity import Tolerance, compare
    from exporter.tokenizer import Tokenizer
    from targets.tvm.runner import run_bundle

    bundle = api.export("android", "tiny", out=tmp_path / "tiny-android")
    if not (bundle / "runner" / "mcpm-run").is_file():  # until the android target installs it itself
        build.install_runner(bundle)
    atol = json.loads((bundle / "manifest.json").read_text())["verification"]["logit_atol"]
    prompt, n = "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.", 24
    ids = Tokenizer(bundle / "tokenizer.model").encode(prompt)
    out = subprocess.run([QEMU, str(bundle / "runner" / "mcpm-run"), "--bundle", str(bundle),
                          "--prompt-ids", ",".join(map(str, ids)), "--gen-len", str(n),
                          "--logits-out", str(tmp_path / "logits.bin")],
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)["tokens"]
    logits = np.fromfile(tmp_path / "logits.bin", dtype="<f4").reshape(n, -1)
    assert [int(np.argmax(row)) for row in logits] == got

    lm = api.load("tiny")
    _, qref, _ = api.quantize(lm, allow_quality_loss=True)
    with torch.no_grad():
        ref = qref(torch.tensor([ids + got[:-1]]))[0, len(ids) - 1:].numpy()
    assert ref.shape == logits.shape
    tol = Tolerance(logit_atol=atol, tokens_must_match=False, reference="PyTorch int4 (teacher forced)")
    compare(list(logits), list(ref), tol).check("runner")     # exporter/parity: the one checker
    top2 = np.sort(ref, axis=1)[:, -2:]
    decisive = (top2[:, 1] - top2[:, 0]) > 2 * atol
    assert decisive.sum() >= 3, "prompt gives too few clear-cut steps to compare tokens"
    assert all(got[i] == int(np.argmax(ref[i])) for i in np.flatnonzero(decisive))

    host_run = run_bundle(bundle, prompt, n)     # stops at EOS; the runner does not
    host = host_run["tokens"]
    first = next((i for i, (a, b) in enumerate(zip(got, host)) if a != b), min(len(got), len(host)))
    assert first == len(host) or not decisive[first], f"runner and host differ at clear-cut step {first}"

    # --prompt: the runner tokenizes on the device (plain chat template of `tiny`: [bos] + the text), so
    # the same ids, the same greedy tokens, and the host's text wherever the tokens agree
    out = subprocess.run([QEMU, str(bundle / "runner" / "mcpm-run"), "--bundle", str(bundle), "--prompt", prompt,
                          "--gen-len", str(n)], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr
    text_run = json.loads(out.stdout)
    assert text_run["prompt_len"] == len(ids) == host_run["prompt_tokens"] and text_run["tokens"] == got
    assert text_run["prompt_text"] == host_run["prompt_text"] == prompt
    eos = Tokenizer(bundle / "tokenizer.model").eos_id
    shown = got[:got.index(eos)] if eos in got else got
    assert text_run["text"] == Tokenizer(bundle / "tokenizer.model").decode(shown)
    if first == len(host):
        assert text_run["text"] == host_run["text"]
