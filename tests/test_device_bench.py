"""The bench harness against fake handsets over the real adb client/server.

The runner here is the aarch64 TEST FIXTURE (device_tests/fixtures/fake_runner.cpp), not mcpm-run:
these tests check the harness's plumbing (facts, sha256-gated push, trials, pull, reports, faults).
"""
import csv
import json

import pytest
from rich.console import Console

from device_tests.harness import BenchConfig, bench, failures, REMOTE_BASE
from device_tests.testing import write_test_manifest
from exporter.errors import ExportError

SMALL = dict(prompt_len=16, gen_len=4, repeat=2, warmup=1, threads=2)


def _bench(adb_server, bundle, out, serials, **kw):
    cfg = BenchConfig(**{**SMALL, **kw})
    console = Console(record=True, width=160)
    report, paths = bench(bundle, out, serials=serials, cfg=cfg, adb_port=adb_server.port, console=console)
    return report, paths, console.export_text()


def test_bench_two_handsets_and_incremental_push(adb_server, fake_handset, fixture_runner, make_bundle, tmp_path):
    (h1, s1), (h2, s2) = fake_handset(), fake_handset(soc="SM8650")
    bundle = make_bundle(fixture_runner)
    report, paths, text = _bench(adb_server, bundle, tmp_path / "out", [s1, s2])
    assert failures(report) == []
    by = {h["serial"]: h for h in report["handsets"]}
    for serial, handset in ((s1, h1), (s2, h2)):
        h = by[serial]
        assert h["emulated"] is True and len(h["trials"]) == 2
        assert h["tokens"] == [1, 8, 15, 22] and h["tokens_identical_across_trials"]
        assert h["summary"]["pp_tok_s"]["n"] == 2 and h["summary"]["pp_tok_s"]["mean"] > 0
        assert h["summary"]["threads"] == 2
        assert all(t["thermal_before"]["battery_c"] is not None for t in h["trials"])
        assert sorted(h["pushed_files"]) == sorted(["manifest.json", "mlc-chat-config.json", "params_shard_0.bin",
                                                    "tensor-cache.json", "runner/mcpm-run"])
        remote = handset.host_path(f"{REMOTE_BASE}/{bundle.name}/params_shard_0.bin")
        assert remote.read_bytes() == (bundle / "params_shard_0.bin").read_bytes()
        runs = [c for c in handset.commands if "./runner/mcpm-run" in c]
        assert handset.runner_runs == len(runs) == 3  # 1 warm-up + 2 trials
        assert "--bundle . --prompt-len 16 --gen-len 4 --threads 2" in runs[0]
    assert by[s2]["facts"]["soc_model"] == "SM8650"
    assert "EMULATED" in text and "pp16 (emulated)" in text and "tg4 (emulated)" in text
    saved = json.loads(paths["json"].read_text())
    assert [h["serial"] for h in saved["handsets"]] == [s1, s2]
    rows = list(csv.DictReader(paths["csv"].open()))
    assert [r["status"] for r in rows] == ["ok", "ok"] and rows[0]["emulated"] == "True"
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"
    raw = tmp_path / "out" / "raw" / s1.replace(":", "_")
    assert sorted(p.name for p in raw.iterdir()) == ["trial-1.json", "trial-2.json", "warmup-1.json"]
    assert json.loads((raw / "trial-2.json").read_text())["tokens"] == [1, 8, 15, 22]

    # second run: nothing changed -> nothing pushed; change one file + a stale one on the device
    report, _, _ = _bench(adb_server, bundle, tmp_path / "out2", [s1], repeat=1, warmup=0)
    assert report["handsets"][0]["pushed_files"] == []
    (bundle / "mlc-chat-config.json").write_text('{"vocab_size": 4096}')
    manifest = json.loads((bundle / "manifest.json").read_text())
    write_test_manifest(bundle, {k: v for k, v in manifest.items() if k not in ("schema", "files")})
    stale = h1.host_path(f"{REMOTE_BASE}/{bundle.name}/old_shard.bin")
    stale.write_bytes(b"old")
    report, _, _ = _bench(adb_server, bundle, tmp_path / "out3", [s1], repeat=1, warmup=0)
    assert report["handsets"][0]["pushed_files"] == ["manifest.json", "mlc-chat-config.json"]
    assert not stale.exists()


def test_runner_crash_and_hang_keep_other_results(adb_server, fake_handset, fixture_runner, make_bundle, tmp_path):
    (_, ok), (_, crash), (hang_h, hang) = fake_handset(), fake_handset(runner_fault="crash"), fake_handset(runner_fault="hang")
    report, paths, text = _bench(adb_server, make_bundle(fixture_runner), tmp_path / "out", [ok, crash, hang],
                                 trial_timeout_s=6)
    by = {h["serial"]: h for h in report["handsets"]}
    assert by[ok]["status"] == "ok" and len(by[ok]["trials"]) == 2
    assert by[crash]["status"] == "failed" and "crashed with signal 11" in by[crash]["error"]
    assert "SIGSEGV" in by[crash]["error"] and "warm-up 1/1" in by[crash]["error"]
    assert by[hang]["status"] == "failed" and "did not finish within 6 s" in by[hang]["error"]
    assert len(failures(report)) == 2
    assert hang_h._procs == set()  # the hung command was killed on the handset when adb hung up
    rows = {r["serial"]: r for r in csv.DictReader(paths["csv"].open())}
    assert rows[ok]["status"] == "ok" and rows[crash]["status"] == "failed"
    assert "FAILED" in text


def test_offline_unauthorized_storage_full_wrong_abi(adb_server, fake_handset, fixture_runner, make_bundle, tmp_path):
    (_, ok), (_, off) = fake_handset(), fake_handset(offline_on_run=2)
    (_, full), (_, x86), (_, v7) = fake_handset(storage_full=True), fake_handset(abi="x86_64"), fake_handset(abi="armeabi-v7a")
    _, unauth = fake_handset(unauthorized=True)
    serials = [ok, off, full, x86, v7, unauth]
    report, paths, _ = _bench(adb_server, make_bundle(fixture_runner), tmp_path / "out", serials)
    by = {h["serial"]: h for h in report["handsets"]}
    assert by[ok]["status"] == "ok" and len(by[ok]["trials"]) == 2
    assert "connection lost" in by[off]["error"] and "trial 1/2" in by[off]["error"]
    assert by[off]["error"].startswith("handset is offline") or by[off]["error"].startswith("handset is not attached")
    assert "No space left on device" in by[full]["error"]
    assert "built for arm64-v8a but the handset's ABI is x86_64" in by[x86]["error"]
    assert "built for arm64-v8a but the handset's ABI is armeabi-v7a" in by[v7]["error"]
    assert by[unauth]["error"].startswith("handset is unauthorized")
    assert len(failures(report)) == 5
    saved = json.loads(paths["json"].read_text())
    assert {h["serial"]: h["status"] for h in saved["handsets"]}[ok] == "ok"


def test_cooldown_waits_for_battery_temperature(adb_server, fake_handset, fixture_runner, make_bundle, tmp_path):
    handset, serial = fake_handset(start_temp_c=44.0, cool_c_per_s=3.0, heat_per_run_c=4.0)
    report, _, _ = _bench(adb_server, make_bundle(fixture_runner), tmp_path / "out", [serial], cooldown_temp=38.0)
    h = report["handsets"][0]
    assert h["status"] == "ok", h["error"]
    for t in h["trials"]:  # every trial started cool; the run heated the handset up
        assert t["thermal_before"]["battery_c"] <= 38.0
        assert t["thermal_after"]["battery_c"] > t["thermal_before"]["battery_c"]
    assert handset.runner_runs == 3


def _lan_ip() -> str:
    import subprocess
    out = subprocess.run(["hostname", "-I"], capture_output=True, text=True).stdout.split()
    return next((a for a in out if "." in a and not a.startswith("127.")), "127.0.0.1")


def test_remote_adb_server(tmp_path, fixture_runner, make_bundle):
    """A device farm: an adb server listening on all interfaces (`adb -a ... nodaemon server`), driven
    with -H/-P from a client that talks to it over the network address, not loopback."""
    import os
    import subprocess
    import time

    from device_tests.adb import Adb
    from device_tests.testing import _free_port

    port, host = _free_port(), _lan_ip()
    env = dict(os.environ, HOME=str(tmp_path))
    server = subprocess.Popen(["adb", "-a", "-P", str(port), "nodaemon", "server"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        remote = Adb(host=host, port=port)
        for _ in range(50):
            if remote.run(["devices"]).returncode == 0:
                break
            time.sleep(0.1)
        from device_tests.fake_handset import FakeHandset
        handset = FakeHandset(serial_hint="farm", root=tmp_path / "farm").start()
        try:
            assert "connected" in remote.run(["connect", handset.address]).stdout
            cfg = BenchConfig(**{**SMALL, "repeat": 1, "warmup": 0})
            report, paths = bench(make_bundle(fixture_runner), tmp_path / "out", all_devices=True, cfg=cfg,
                                  adb_host=host, adb_port=port, console=Console(record=True))
            assert report["adb"] == f"adb server {host}:{port}"
            assert [h["status"] for h in report["handsets"]] == ["ok"]
        finally:
            handset.go_offline()
    finally:
        subprocess.run(["adb", "-H", host, "-P", str(port), "kill-server"], env=env, capture_output=True, timeout=30)
        server.wait(timeout=10)


def test_cli_bench_exit_status_and_reports(adb_server, fake_handset, fixture_runner, make_bundle, tmp_path):
    import subprocess
    import sys

    (_, ok), (_, crash) = fake_handset(), fake_handset(runner_fault="crash")
    bundle, out = make_bundle(fixture_runner), tmp_path / "out"
    args = [sys.executable, "-m", "exporter.cli", "bench", str(bundle), "--all", "--prompt-len", "8", "--gen-len", "2",
            "--repeat", "1", "--warmup", "0", "--adb-port", str(adb_server.port), "--out", str(out)]
    p = subprocess.run(args, capture_output=True, text=True, env=adb_server.env, timeout=120)
    assert p.returncode == 1
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("error: 1 of 2 handset(s) failed") and crash in last
    saved = json.loads((out / "bench.json").read_text())
    assert {h["serial"]: h["status"] for h in saved["handsets"]} == {ok: "ok", crash: "failed"}

    (bundle / "manifest.json").unlink()  # bad input: one clear line naming what and where
    p = subprocess.run(args, capture_output=True, text=True, env=adb_server.env, timeout=60)
    assert p.returncode == 1
    assert p.stderr.strip().splitlines()[-1] == f"error: not a finished mcpm-export bundle: {bundle}/manifest.json is missing"


def test_tampered_bundle_is_never_pushed(adb_server, fake_handset, fixture_runner, make_bundle, tmp_path):
    h, serial = fake_handset()
    bundle = make_bundle(fixture_runner)
    shard = bundle / "params_shard_0.bin"
    shard.write_bytes(shard.read_bytes()[:-10])  # truncated after the manifest was written
    with pytest.raises(ExportError, match=r"does not verify against its manifest: .*params_shard_0.bin: size"):
        bench(bundle, tmp_path / "out", serials=[serial], cfg=BenchConfig(repeat=1, warmup=0),
              adb_port=adb_server.port, console=Console(record=True))
    assert not h.host_path(f"{REMOTE_BASE}/{bundle.name}").exists()
