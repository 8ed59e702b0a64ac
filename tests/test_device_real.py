"""Against real handsets: `ANDROID_SERIAL=... MCPM_BENCH_BUNDLE=dist/tiny-android pytest -m device`.

Uses the adb server the environment points at (ANDROID_ADB_SERVER_PORT; MCPM_ADB_HOST for a remote one).
"""
import json
import os
from pathlib import Path

import pytest
from rich.console import Console

from device_tests.harness import BenchConfig, bench, failures, runner_synthetic_prompt

pytestmark = pytest.mark.device


@pytest.fixture
def real_target():
    serial = os.environ.get("ANDROID_SERIAL")
    bundle = os.environ.get("MCPM_BENCH_BUNDLE")
    if not serial:
        pytest.skip("set ANDROID_SERIAL to run against a real handset")
    if not bundle or not (Path(bundle) / "runner" / "mcpm-run").is_file():
        pytest.skip("set MCPM_BENCH_BUNDLE to an android bundle directory that contains runner/mcpm-run")
    return serial, Path(bundle)


def test_bench_real_handset(real_target, tmp_path):
    serial, bundle = real_target
    port = os.environ.get("ANDROID_ADB_SERVER_PORT")
    cfg = BenchConfig(prompt_len=32, gen_len=8, repeat=2, warmup=1)
    report, paths = bench(bundle, tmp_path / "out", serials=[serial], cfg=cfg, adb_host=os.environ.get("MCPM_ADB_HOST"),
                          adb_port=int(port) if port else None, console=Console(record=True))
    assert failures(report) == []
    h = report["handsets"][0]
    f = h["facts"]
    assert f["abi"] in f["abilist"] and f["cpu_cores"] and f["mem_total_kb"] and f["model"]
    assert len(h["tokens"]) == 8 and h["tokens_identical_across_trials"]
    assert all(t["prefill_tok_s"] > 0 and t["decode_tok_s"] > 0 for t in h["trials"])
    manifest = json.loads((bundle / "manifest.json").read_text())
    if manifest.get("recipe") == "tiny":  # the embedded model: compare with the host reference
        import torch

        from exporter import api

        lm = api.load("tiny")
        _, qref, _ = api.quantize(lm, allow_quality_loss=True)
        mlc = json.loads((bundle / "mlc-chat-config.json").read_text())
        prompt = runner_synthetic_prompt(mlc.get("vocab_size", lm.config.vocab_size), 32, mlc.get("bos_token_id", 1))
        with torch.no_grad():
            ref, _ = qref.generate(prompt, 8, prefill_chunk=lm.recipe.prefill_chunk)
        assert h["tokens"] == ref
    assert paths["png"].is_file()
