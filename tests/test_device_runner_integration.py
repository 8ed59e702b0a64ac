"""End to end on the fake handset with the REAL runner (aarch64 mcpm-run + TVM runtime, under qemu-aarch64),
driven through the real adb client/server by the bench harness:

- the `tiny` android bundle (mcpm-export android): greedy tokens must equal the PyTorch reference;
- the runner's dev model bundle (runner/devmodel.py, random weights): tokens must equal its numpy reference.

Timings are emulated and every report says so. Skipped only when the runner binary cannot be built
(e.g. its aarch64 TVM wheels cannot be fetched).
"""
import json

import pytest
import torch
from rich.console import Console

from device_tests.harness import BenchConfig, bench, failures, runner_synthetic_prompt
from device_tests.report import EMULATED_NOTE
from device_tests.testing import write_test_manifest
from exporter.errors import ExportError

PROMPT_LEN, GEN_LEN = 24, 8


@pytest.fixture(scope="module")
def runner_built():
    from runner.build import build_runner

    try:
        return build_runner()
    except ExportError as e:
        pytest.skip(f"runner binary cannot be built: {e}")


@pytest.fixture(scope="module")
def tiny_android_bundle(runner_built, tmp_path_factory):
    from exporter import api
    from runner.build import install_runner

    bundle = api.export("android", "tiny", out=tmp_path_factory.mktemp("bundles") / "tiny-android")
    if not (bundle / "runner" / "mcpm-run").is_file():  # until the android target installs it itself
        install_runner(bundle)
    return bundle


@pytest.mark.slow
def test_runner_tokens_on_fake_handset_equal_host_reference(adb_server, fake_handset, tiny_android_bundle, tmp_path):
    from exporter import api

    handset, serial = fake_handset()
    cfg = BenchConfig(prompt_len=PROMPT_LEN, gen_len=GEN_LEN, repeat=2, warmup=0, threads=1, trial_timeout_s=600)
    console = Console(record=True, width=160)
    report, paths = bench(tiny_android_bundle, tmp_path / "out", serials=[serial], cfg=cfg,
                          adb_port=adb_server.port, console=console)
    assert failures(report) == []
    h = report["handsets"][0]

    lm = api.load("tiny")
    _, qref, _ = api.quantize(lm, allow_quality_loss=True)
    mlc = json.loads((tiny_android_bundle / "mlc-chat-config.json").read_text())
    prompt = runner_synthetic_prompt(mlc.get("vocab_size", lm.config.vocab_size), PROMPT_LEN, mlc.get("bos_token_id", 1))
    with torch.no_grad():
        ref, _ = qref.generate(prompt, GEN_LEN, prefill_chunk=lm.recipe.prefill_chunk)
    assert h["tokens"] == ref[:GEN_LEN]
    assert h["tokens_identical_across_trials"]

    # emulated timings are labelled as such everywhere
    assert h["emulated"] and all(t["emulated"] for t in h["trials"])
    assert EMULATED_NOTE in console.export_text()
    assert json.loads(paths["json"].read_text())["handsets"][0]["emulated"] is True
    assert "True" in paths["csv"].read_text().splitlines()[1]


@pytest.mark.slow
def test_runner_dev_model_on_fake_handset_equals_numpy_reference(adb_server, fake_handset, runner_built, tmp_path):
    from runner import devmodel
    from runner.build import install_runner

    bundle = tmp_path / "devmodel-android"
    params = devmodel.build_bundle(bundle)
    install_runner(bundle)
    write_test_manifest(bundle, {"recipe": "devmodel", "target": "android",
                                 "note": "runner dev model (random weights), test only"})
    _, serial = fake_handset()
    cfg = BenchConfig(prompt_len=12, gen_len=6, repeat=1, warmup=1, threads=2, trial_timeout_s=600)
    report, _ = bench(bundle, tmp_path / "out", serials=[serial], cfg=cfg, adb_port=adb_server.port,
                      console=Console(record=True))
    assert failures(report) == []
    h = report["handsets"][0]
    prompt = runner_synthetic_prompt(devmodel.VOCAB, 12)
    assert h["tokens"] == devmodel.reference_greedy(params, prompt, 6)
    assert h["emulated"] and h["trials"][0]["prefill_tok_s"] > 0
