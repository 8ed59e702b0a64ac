"""The fake handset against the real adb client and server: shell v2, legacy shell, sync push/pull/ls."""
import hashlib
import os

from device_tests.facts import FACTS_COMMAND, THERMAL_COMMAND, parse_facts, parse_thermals


def test_shell_v2_exit_codes_and_streams(adb_server, fake_handset):
    handset, serial = fake_handset()
    p = adb_server.run("-s", serial, "shell", "echo out; echo err >&2; exit 7")
    assert p.returncode == 7
    assert p.stdout == "out\n" and p.stderr == "err\n"
    p = adb_server.run("-s", serial, "shell", "cat", timeout=10)  # stdin closed -> cat ends
    assert p.returncode == 0
    assert handset.commands[-1] == "cat"


def test_legacy_shell_and_exec_services(adb_server, fake_handset):
    handset, serial = fake_handset()
    p = adb_server.run("-s", serial, "shell", "-x", "echo legacy; echo e >&2; exit 3")
    assert "legacy\n" in p.stdout and "e\n" in p.stdout  # legacy shell: one merged stream
    p = adb_server.run("-s", serial, "exec-out", "echo raw")
    assert p.stdout == "raw\n"
    assert any(s.startswith("shell:") for s in handset.services), handset.services
    assert any(s.startswith("exec:") for s in handset.services), handset.services
    assert any(s.startswith("shell,v2") for s in handset.services) is False


def test_getprop_facts_and_thermals(adb_server, fake_handset):
    handset, serial = fake_handset(abi="armeabi-v7a", start_temp_c=41.5, cool_c_per_s=0.0)
    p = adb_server.run("-s", serial, "shell", "getprop ro.product.cpu.abi")
    assert p.stdout.strip() == "armeabi-v7a"
    facts = parse_facts(adb_server.run("-s", serial, "shell", FACTS_COMMAND).stdout)
    assert facts["abi"] == "armeabi-v7a" and facts["abilist"] == ["armeabi-v7a", "armeabi"]
    assert facts["cpu_cores"] == 8 and len(facts["cpu_max_freq_khz"]) == 8 and max(facts["cpu_max_freq_khz"]) == 2800000
    assert facts["mem_total_kb"] == 7812456 and facts["emulated"] is True
    assert facts["os"] == "Android 14 (SDK 34)" and facts["soc_model"] == "QEMU-A64"
    th = parse_thermals(adb_server.run("-s", serial, "shell", THERMAL_COMMAND).stdout)
    assert th == {"battery_c": 41.5, "thermal_status": 1}


def test_harmonyos_facts(adb_server, fake_handset):
    _, serial = fake_handset(extra_props={"hw_sc.build.platform.version": "4.2.0", "ro.build.version.release": "12",
                                          "ro.soc.model": "Kirin9000S"})
    facts = parse_facts(adb_server.run("-s", serial, "shell", FACTS_COMMAND).stdout)
    assert facts["os"] == "HarmonyOS 4.2.0 (Android 12 base)" and facts["soc_model"] == "Kirin9000S"


def test_push_pull_stat_list_roundtrip(adb_server, fake_handset, tmp_path):
    handset, serial = fake_handset()
    src = tmp_path / "blob.bin"
    src.write_bytes(os.urandom(700_000))  # > several WRTE payloads and DATA chunks
    src.chmod(0o750)
    p = adb_server.run("-s", serial, "push", str(src), "/data/local/tmp/a/b/blob.bin")
    assert p.returncode == 0, p.stderr
    on_device = handset.host_path("/data/local/tmp/a/b/blob.bin")
    assert on_device.read_bytes() == src.read_bytes() and (on_device.stat().st_mode & 0o777) == 0o750
    p = adb_server.run("-s", serial, "shell", "sha256sum /data/local/tmp/a/b/blob.bin")
    assert p.stdout.split()[0] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert p.stdout.split()[1] == "/data/local/tmp/a/b/blob.bin"  # device paths, not host paths
    back = tmp_path / "back.bin"
    assert adb_server.run("-s", serial, "pull", "/data/local/tmp/a/b/blob.bin", str(back)).returncode == 0
    assert back.read_bytes() == src.read_bytes()
    # directory pull goes through LIST
    assert adb_server.run("-s", serial, "pull", "/data/local/tmp/a", str(tmp_path / "dir")).returncode == 0
    assert (tmp_path / "dir" / "b" / "blob.bin").read_bytes() == src.read_bytes()
    p = adb_server.run("-s", serial, "pull", "/data/local/tmp/nope", str(tmp_path / "x"))
    assert p.returncode != 0 and "does not exist" in p.stdout + p.stderr


def test_storage_full_push_fails_cleanly(adb_server, fake_handset, tmp_path):
    handset, serial = fake_handset(storage_full=True)
    src = tmp_path / "f.bin"
    src.write_bytes(b"x" * 100_000)
    p = adb_server.run("-s", serial, "push", str(src), "/data/local/tmp/f.bin")
    assert p.returncode != 0 and "No space left on device" in p.stdout + p.stderr
    assert not handset.host_path("/data/local/tmp/f.bin").exists()


def test_unauthorized_handset_stays_unauthorized(adb_server, fake_handset):
    handset, serial = fake_handset(unauthorized=True)
    p = adb_server.run("-s", serial, "shell", "echo hi")
    assert p.returncode != 0 and "unauthorized" in p.stdout + p.stderr
    assert handset.commands == []


def test_aarch64_binary_runs_under_qemu(adb_server, fake_handset, fixture_runner):
    handset, serial = fake_handset()
    assert adb_server.run("-s", serial, "push", str(fixture_runner), "/data/local/tmp/t/run").returncode == 0
    p = adb_server.run("-s", serial, "shell", "cd /data/local/tmp/t && ./run --prompt-len 8 --gen-len 3")
    assert p.returncode == 0, p.stderr
    assert '"tokens": [1, 8, 15]' in p.stdout


def test_pkill_on_the_fake_never_reaches_host_processes(adb_server, fake_handset):
    import subprocess

    handset, serial = fake_handset()
    host = subprocess.Popen(["sleep", "301"])  # a host process matching the pattern below
    try:
        p = adb_server.run("-s", serial, "shell", "n=301; sleep $n & b=$!; sleep 0.3; pkill -f 'sleep 30[1]'; wait $b; echo rc=$?")
        assert p.stdout.strip() == "rc=143"  # the handset's own sleep got SIGTERM
        assert host.poll() is None  # the host's did not
    finally:
        host.kill()
        host.wait()
