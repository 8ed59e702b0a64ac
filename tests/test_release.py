"""Release archives: reproducible packing, versioned names, refusals before anything is written, and
real `tiny` releases built twice with byte-identical archives (android in the default tier; harmony
and ios are slow)."""
import hashlib
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from exporter import __version__
from exporter.cli import main
from exporter.errors import ExportError
from exporter.release import conflicts, pack, plan, release
from exporter.verify import verify_bundle
from tests.support.release_bundles import assemble_bundle, build_libs, compile_libs

NAME = f"mcpm-tiny-android-q4f16_e8-v{__version__}"


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_tvm_libraries_are_byte_identical_across_compiles(tmp_path):
    """TVM's export_library stamps tar member mtimes/owners; pipeline.save_tar normalizes them."""
    compile_libs(tmp_path / "a", "mcpm_tiny_")
    os.utime(tmp_path, (1, 1))
    compile_libs(tmp_path / "b", "mcpm_tiny_")
    for rel in ("lib/cpu/model.tar", "lib/cpu/model.so", "lib/host/model.so"):
        assert sha(tmp_path / "a" / rel) == sha(tmp_path / "b" / rel), rel
    with tarfile.open(tmp_path / "a" / "lib/cpu/model.tar") as tar:
        assert all(m.mtime == 0 and m.uid == 0 and m.uname == "" for m in tar.getmembers())


def test_pack_is_reproducible_and_normalized(tmp_path):
    libs = build_libs(tmp_path / "libs")
    b1 = assemble_bundle(tmp_path / "one" / NAME, libs)
    b2 = assemble_bundle(tmp_path / "two" / NAME, libs)
    os.utime(b2 / "params_shard_0.bin", (12345, 12345))      # different mtimes and modes
    (b2 / "lib" / "cpu" / "model.so").chmod(0o700)
    (b1 / "lib" / "cpu" / "model.so").chmod(0o755)
    a1, a2 = tmp_path / "a1.tar.gz", tmp_path / "a2.tar.gz"
    pack(b1, a1, NAME)
    pack(b2, a2, NAME)
    assert sha(a1) == sha(a2)
    raw = a1.read_bytes()
    assert raw[:2] == b"\x1f\x8b" and raw[3] & 0x08 == 0 and raw[4:8] == b"\0\0\0\0"   # no FNAME, mtime 0
    with tarfile.open(a1) as tar:
        members = tar.getmembers()
    names = [m.name for m in members]
    assert names[0] == NAME and names == sorted(names, key=lambda n: n.split("/"))
    assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 and m.uname == "" and m.gname == "" for m in members)
    modes = {m.name.removeprefix(NAME + "/"): m.mode for m in members}
    assert modes["lib/cpu/model.so"] == 0o755 and modes["manifest.json"] == 0o644 and modes["lib"] == 0o755


def test_plan_validates_everything_first():
    assert [(i.recipe.name, i.target) for i in plan(["tiny"], "all")] == \
        [("tiny", "android"), ("tiny", "harmony"), ("tiny", "ios")]
    assert [i.name for i in plan(["tiny", "tiny"], "android")] == [NAME]
    assert [i.target for i in plan(["v-int4"], "all")] == ["android", "harmony"]    # vision: no ios
    with pytest.raises(ExportError, match="recipe 'v-int4' does not allow target 'ios'"):
        plan(["tiny", "v-int4"], "ios")
    with pytest.raises(ExportError, match=r"unknown recipe 'nope' \(known: .*tiny"):
        plan(["tiny", "nope"], "android")
    with pytest.raises(ExportError, match="--target: unknown target 'windows'"):
        plan(["tiny"], "windows")
    with pytest.raises(ExportError, match="--model: give one or more recipe names"):
        plan(["tiny", ""], "android")


def test_older_archive_in_out_is_refused_before_building(tmp_path):
    out = tmp_path / "rel"
    out.mkdir()
    old = out / "mcpm-tiny-android-q4f16_e8-v0.0.9.tar.gz"
    old.write_bytes(b"old release")
    (out / "mcpm-tiny-ios-q4f16_e8-v0.0.9.tar.gz").write_bytes(b"other target")
    assert conflicts(out, plan(["tiny"], "android")) == [old]
    before = sorted(os.listdir(out))
    with pytest.raises(ExportError, match=f"--out {out}: already holds {old.name}; remove it or pass --force"):
        release(["tiny"], "android", out)
    assert sorted(os.listdir(out)) == before and old.read_bytes() == b"old release"
    res = CliRunner().invoke(main, ["release", "--model", "tiny", "--target", "android", "--out", str(out)])
    assert res.exit_code == 1 and "already holds mcpm-tiny-android-q4f16_e8-v0.0.9.tar.gz" in res.output
    (tmp_path / "file").write_text("x")
    with pytest.raises(ExportError, match="exists and is not a directory"):
        release(["tiny"], "android", tmp_path / "file")


def test_failed_build_leaves_nothing(tmp_path):
    """sft-int4's checkpoint is not on this machine: the export fails, --out stays empty."""
    out = tmp_path / "rel"
    with pytest.raises(ExportError):
        release(["sft-int4"], "android", out)
    assert list(out.iterdir()) == []


def test_cli_rejects_unknown_target_and_recipe(tmp_path):
    runner = CliRunner()
    res = runner.invoke(main, ["release", "--model", "tiny", "--target", "windows", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "windows" in res.output
    res = runner.invoke(main, ["release", "--model", "tiny,nope", "--target", "all", "--out", str(tmp_path / "o")])
    assert res.exit_code == 1 and "unknown recipe 'nope'" in res.output
    assert not (tmp_path / "o").exists()


def test_cli_checkpoint_passthrough(tmp_path):
    """--checkpoint reaches the export (a missing folder is named in the error) and needs one recipe."""
    runner = CliRunner()
    res = runner.invoke(main, ["release", "--model", "tiny,sft-int4", "--target", "android", "--checkpoint",
                               str(tmp_path), "--out", str(tmp_path / "o")])
    assert res.exit_code == 1 and "exactly one --model" in res.output
    missing = tmp_path / "no-such-checkpoint"
    res = runner.invoke(main, ["release", "--model", "sft-int4", "--target", "android", "--checkpoint",
                               str(missing), "--out", str(tmp_path / "o")])
    assert res.exit_code == 1 and str(missing) in res.output, res.output
    assert not (tmp_path / "o").exists() or list((tmp_path / "o").iterdir()) == []


def build_twice(target: str, tmp_path: Path) -> Path:
    """Once through the API in this process, once through the CLI in a fresh one."""
    r1 = release(["tiny"], target, tmp_path / "one")
    cli = subprocess.run([sys.executable, "-m", "exporter.cli", "release", "--model", "tiny", "--target", target,
                          "--out", str(tmp_path / "two"), "--json"], capture_output=True, text=True,
                         cwd=Path(__file__).parent.parent, timeout=3000)
    assert cli.returncode == 0, cli.stderr[-2000:]
    r2 = json.loads(cli.stdout)
    a1, a2 = Path(r1[0]["archive"]), Path(r2[0]["archive"])
    assert a1.name == a2.name == f"mcpm-tiny-{target}-q4f16_e8-v{__version__}.tar.gz"
    print(f"{a1.name}: sha256 {r1[0]['sha256']}, {r1[0]['size']} bytes")
    if r1[0]["sha256"] != r2[0]["sha256"]:
        differ = [rel for rel, meta in _files(a1).items() if _files(a2).get(rel) != meta]
        pytest.fail(f"{target}: archives differ; files that differ: {differ}")
    assert verify_bundle(a1) == []
    return a1


def _files(archive: Path) -> dict:
    with tarfile.open(archive) as tar:
        return {m.name: hashlib.sha256(tar.extractfile(m).read()).hexdigest() for m in tar if m.isfile()}


def test_tiny_android_release_is_reproducible(tmp_path):
    """Default tier: the real `tiny` android release, built twice (API here, CLI in a fresh process),
    byte-identical and verifying. ~70 s on an idle 2-core machine."""
    archive = build_twice("android", tmp_path)
    res = CliRunner().invoke(main, ["verify", str(archive)])
    assert res.exit_code == 0, res.output


@pytest.mark.slow
@pytest.mark.parametrize("target", ["harmony", "ios"])
def test_tiny_release_is_reproducible(target, tmp_path):
    archive = build_twice(target, tmp_path)
    res = CliRunner().invoke(main, ["verify", str(archive)])
    assert res.exit_code == 0, res.output


def test_shape_func_canonical_order_keeps_dependent_stores():
    """targets/tvm/reproducible.py sorts independent slot stores only."""
    import tvm
    from tvm import tirx
    from targets.tvm.reproducible import canonical_order

    H = tirx.decl_buffer((4,), "int64", name="H")
    load = lambda k: tirx.BufferLoad(H, [tvm.tirx.IntImm("int64", k)])  # noqa: E731
    store = lambda k, v: tirx.BufferStore(H, v, [tvm.tirx.IntImm("int64", k)])  # noqa: E731
    independent = tirx.SeqStmt([store(3, load(0) * 2), store(1, load(0) * 4), store(2, load(0) + 1)])
    assert [int(s.indices[0].value) for s in canonical_order(independent).seq] == [1, 2, 3]
    dependent = tirx.SeqStmt([store(3, load(0) * 2), store(1, load(3) * 4)])   # reads slot 3 written above
    assert [int(s.indices[0].value) for s in canonical_order(dependent).seq] == [3, 1]
