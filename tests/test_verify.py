"""exporter/verify.py on bundles assembled with exporter.bundle.Staging around real TVM libraries
(tests/support/release_bundles.py)."""
import json
import shutil
import tarfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from exporter.bundle import manifest_text, sha256_file, tool_versions
from exporter.cli import main
from exporter.errors import ExportError
from exporter.release import pack
from exporter.verify import bundle_references, elf_symbols, library_symbols, require_verified, verify_bundle
from tests.support.release_bundles import assemble_bundle, build_libs

NAME = "mcpm-tiny-android-q4f16_e8-v0.1.0"


@pytest.fixture(scope="module")
def libs(tmp_path_factory):
    return build_libs(tmp_path_factory.mktemp("libs"))


@pytest.fixture
def bundle(tmp_path, libs):
    return assemble_bundle(tmp_path / NAME, libs)


def rewrite_manifest(bundle: Path, change, restamp: bool = True) -> None:
    """Edit manifest.json; ``restamp``: with a matching digest (to test the other checks in isolation)."""
    m = json.loads((bundle / "manifest.json").read_text())
    change(m)
    (bundle / "manifest.json").write_text(manifest_text(m) if restamp else json.dumps(m))


def test_good_bundle_and_its_archive_verify(bundle, tmp_path):
    assert verify_bundle(bundle) == []
    assert verify_bundle(bundle, host_run=True) == []     # built with the installed TVM
    archive = tmp_path / f"{NAME}.tar.gz"
    pack(bundle, archive, NAME)
    assert verify_bundle(archive) == []
    require_verified(archive)


def test_elf_reader_agrees_with_the_libraries(bundle):
    members = library_symbols(bundle / "lib" / "cpu" / "model.tar")
    assert {m for m, _, _ in members} == {"lib0.o", "mcpm_tiny_devc.o"}
    assert all(machine == "aarch64" for _, machine, _ in members)
    machine, syms = elf_symbols((bundle / "lib" / "cpu" / "model.so").read_bytes(), "so")
    assert machine == "aarch64" and "mcpm_tiny___tvm_ffi__library_bin" in syms
    machine, syms = elf_symbols((bundle / "lib" / "host" / "model.so").read_bytes(), "host")
    assert machine == "x86_64" and "__tvm_ffi__library_bin" in syms
    with pytest.raises(ExportError, match="not an ELF"):
        elf_symbols(b"hello world" * 10, "x")
    with pytest.raises(ExportError, match="truncated or corrupt"):
        elf_symbols((bundle / "lib" / "cpu" / "model.so").read_bytes()[:2000], "cut")


def test_tampered_truncated_missing_and_extra_files(bundle):
    shard = bundle / "params_shard_0.bin"
    data = bytearray(shard.read_bytes())
    data[100] ^= 1
    shard.write_bytes(bytes(data))
    (bundle / "mlc-chat-config.json").write_text("{}")                       # truncated
    (bundle / "lib" / "host" / "model.so").unlink()                          # missing
    (bundle / "notes.txt").write_text("extra")                               # not in the manifest
    problems = verify_bundle(bundle)
    text = "\n".join(problems)
    assert f"{shard}: sha256 differs from manifest" in problems
    assert "mlc-chat-config.json: size 2 != manifest" in text
    assert f"{bundle / 'lib/host/model.so'}: missing" in problems
    assert f"{bundle / 'notes.txt'}: not listed in the manifest" in problems
    with pytest.raises(ExportError, match="bundle does not verify"):
        require_verified(bundle)


def test_manifest_schema(bundle):
    mf = bundle / "manifest.json"
    rewrite_manifest(bundle, lambda m: (m.pop("recipe"), m.update(versions="0.27", schema="other/1")))
    problems = verify_bundle(bundle)
    assert problems == [f"{mf}: required key 'recipe' is missing",      # and nothing that needs those keys
                        f"{mf}: key 'versions' must be a dict, not str",
                        f"{mf}: schema 'other/1' is not 'mcpm-export/manifest/1'"]
    rewrite_manifest(bundle, lambda m: (m.update(recipe="tiny", versions={}, schema="mcpm-export/manifest/1"),
                                        m["files"].update({"../x": {"sha256": "0" * 64, "size": 1}})))
    problems = verify_bundle(bundle)
    assert f"{mf}: files: unsafe or reserved path '../x'" in problems
    assert f"{mf}: versions.mcpm_export != mcpm_export_version" in problems
    mf.write_text("{not json")
    assert verify_bundle(bundle)[0].startswith(f"{mf}: not valid JSON")


def test_symbol_prefix_must_be_in_the_libraries(tmp_path, libs):
    b = assemble_bundle(tmp_path / "b", libs, prefix_libs="other")        # compiled under mcpm_other_
    problems = verify_bundle(b)
    assert len(problems) == 2
    for rel in ("lib/cpu/model.tar", "lib/cpu/model.so"):
        assert f"{b / rel}: no 'mcpm_tiny___tvm_ffi__library_bin' symbol: not a system library with prefix " \
               f"'mcpm_tiny_' (it has prefix 'mcpm_other_')" in problems
    b = assemble_bundle(tmp_path / "c", libs, manifest_extra={"system_lib_prefix": "mcpm_tiny2_",
                                                              "triple": "aarch64-linux-ohos"})
    problems = verify_bundle(b)
    assert f"{b / 'manifest.json'}: triple 'aarch64-linux-ohos' is not the android triple " \
           f"'aarch64-linux-android'" in problems
    assert f"{b / 'manifest.json'}: system_lib_prefix 'mcpm_tiny2_' does not match recipe 'tiny' " \
           f"(expected 'mcpm_tiny_')" in problems
    conf = {"model_lib": {"system_lib_prefix": "mcpm_tiny_"}, "mcpm": {"libs": {"cpu": {"prefix": "mcpm_tiny2_"}}}}
    b = assemble_bundle(tmp_path / "d", libs, chat_config=conf)      # MLC's apps need a string model_lib
    assert verify_bundle(b) == [
        f"{b / 'mlc-chat-config.json'}: model_lib must be a string (MLC's system-lib name), got "
        f"{{'system_lib_prefix': 'mcpm_tiny_'}}",
        f"{b / 'mlc-chat-config.json'}: mcpm.libs.cpu.prefix 'mcpm_tiny2_' != manifest 'mcpm_tiny_'"]


def test_library_for_the_wrong_machine(tmp_path, libs):
    shutil.copyfile(libs / "tiny" / "lib" / "host" / "model.so", libs / "swapped.so")
    b = assemble_bundle(tmp_path / "b", libs)
    rewrite = b / "lib" / "cpu" / "model.so"
    rewrite.write_bytes((libs / "swapped.so").read_bytes())
    rewrite_manifest(b, lambda m: m["files"]["lib/cpu/model.so"].update(
        sha256=sha256_file(rewrite), size=rewrite.stat().st_size))
    problems = verify_bundle(b)
    assert f"{rewrite}: x86_64 code, libs.cpu needs aarch64" in problems


def test_versions_runner_runtime_and_host(bundle):
    (bundle / "runner").mkdir()
    (bundle / "runner" / "mcpm-run").write_bytes(b"\x7fELF runner")
    build = {"files": {"mcpm-run": __import__("hashlib").sha256(b"\x7fELF runner").hexdigest()},
             "inputs": {"wheels": {"apache_tvm-0.26.0-py3-none-manylinux_2_28_aarch64.whl": "0" * 64,
                                   "apache_tvm_ffi-0.1.14.post0-cp311-cp311-manylinux_2_28_aarch64.whl": "0" * 64}}}
    (bundle / "runner" / "BUILD.json").write_text(json.dumps(build))
    problems = verify_bundle(bundle)     # a runner added after finalize is checked against its BUILD.json
    tvm = tool_versions()["apache-tvm"]
    assert problems == [f"{bundle / 'runner' / 'BUILD.json'}: runner's TVM runtime is not apache-tvm {tvm}, "
                        f"the version that compiled the model library"]
    (bundle / "runner" / "mcpm-run").write_bytes(b"\x7fELF runneR")
    assert f"{bundle / 'runner' / 'mcpm-run'}: sha256 differs from manifest" in verify_bundle(bundle)
    shutil.rmtree(bundle / "runner")
    rewrite_manifest(bundle, lambda m: m["versions"].update({"apache-tvm": "0.20.0"}))
    assert verify_bundle(bundle) == []
    assert verify_bundle(bundle, host_run=True) == [
        f"{bundle}: compiled with apache-tvm 0.20.0, this runtime is {tvm} (pip install apache-tvm==0.20.0)"]


def test_archives_truncated_renamed_or_tampered(bundle, tmp_path):
    archive = tmp_path / f"{NAME}.tar.gz"
    pack(bundle, archive, NAME)
    cut = tmp_path / "cut" / archive.name
    cut.parent.mkdir()
    cut.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    problems = verify_bundle(cut)
    assert len(problems) == 1 and problems[0].startswith(f"{cut}: truncated or unreadable archive")
    renamed = tmp_path / "mcpm-tiny-android-q4f16_e8-v9.9.9.tar.gz"
    shutil.copyfile(archive, renamed)
    assert verify_bundle(renamed) == [f"{renamed}: archive holds '{NAME}/', expected "
                                      f"'mcpm-tiny-android-q4f16_e8-v9.9.9/' (renamed archive?)"]
    (bundle / "params_shard_0.bin").write_bytes(b"tampered")
    bad = tmp_path / "bad" / archive.name
    bad.parent.mkdir()
    pack(bundle, bad, NAME)
    problems = verify_bundle(bad)
    assert problems == [f"{bad}:{NAME}/params_shard_0.bin: size 8 != manifest 16384"]
    # an archive whose member escapes its directory is refused, nothing is extracted outside
    evil = tmp_path / "evil" / f"{NAME}.tar.gz"
    evil.parent.mkdir()
    with tarfile.open(evil, "w:gz") as tar:
        tar.add(bundle, arcname=NAME)
        tar.add(bundle / "manifest.json", arcname=f"{NAME}/../../escaped.json")
    problems = verify_bundle(evil)
    assert len(problems) == 1 and not (tmp_path / "escaped.json").exists()


def test_verify_cli_one_line_per_problem(bundle):
    runner = CliRunner()
    ok = runner.invoke(main, ["verify", str(bundle)])
    assert ok.exit_code == 0, ok.output
    (bundle / "params_shard_0.bin").write_bytes(b"x")
    (bundle / "extra.bin").write_bytes(b"x")
    bad = runner.invoke(main, ["verify", str(bundle)])
    assert bad.exit_code == 1
    lines = [l for l in bad.output.splitlines() if l.strip()]
    assert [l.split(":")[0] for l in lines] == ["problem", "problem", "error"]
    assert lines[-1] == f"error: {bundle}: 2 problem(s); do not ship or run this bundle"


def test_run_refuses_a_bundle_that_does_not_verify(bundle):
    from targets.tvm.runner import run_bundle

    (bundle / "params_shard_0.bin").write_bytes(b"x")
    with pytest.raises(ExportError, match="bundle does not verify: .*params_shard_0.bin: size 1 != manifest"):
        run_bundle(bundle, "hello", 2)


def test_every_referenced_file_exists_and_is_hashed(bundle):
    """Issue 12 #6: on-device libraries deleted and the files table edited to match (digest re-stamped)."""
    shutil.rmtree(bundle / "lib" / "cpu")
    rewrite_manifest(bundle, lambda m: [m["files"].pop(k) for k in list(m["files"]) if k.startswith("lib/cpu/")])
    assert verify_bundle(bundle) == [
        f"{bundle / 'lib/cpu/model.so'}: missing (manifest.json libs.cpu.so refers to it)",
        f"{bundle / 'lib/cpu/model.tar'}: missing (manifest.json libs.cpu.tar refers to it)"]
    # mlc-chat-config.json's references count too: a tokenizer file present but never hashed
    (bundle / "tokenizer.model").write_bytes(b"sp")
    conf = {"model_lib": {"system_lib_prefix": "mcpm_tiny_"}, "tokenizer_files": ["tokenizer.model"]}
    (bundle / "mlc-chat-config.json").write_text(json.dumps(conf))
    problems = verify_bundle(bundle)
    assert f"{bundle / 'tokenizer.model'}: not hashed in the manifest (mlc-chat-config.json tokenizer_files[0] " \
           f"refers to it)" in problems


def test_bundle_references_are_generic_over_the_config():
    """MLC-LLM's layout (params at the root, model_lib a library name) needs no change here."""
    mlc = {"model_lib": "mcpm_tiny_q4f16_e8", "tokenizer_files": ["tokenizer.model", "tokenizer_config.json"],
           "model_config": {"hidden_size": 256}, "params": "tensor-cache.json (records)"}
    assert bundle_references(mlc, "c") == [("tokenizer.model", "c tokenizer_files[0]"),
                                           ("tokenizer_config.json", "c tokenizer_files[1]"),
                                           ("tensor-cache.json", "c params")]
    manifest = {"libs": {"cpu": {"tar": "lib/cpu/model.tar", "target": "llvm -mtriple=aarch64"}},
                "source": {"repo_id": "openbmb/x"}, "quality": {"text": "calibration.txt (windows 16+)"},
                "coreml": {"package": "MiniCPM.mlpackage"}, "vision": {"config": "vision/vision-config.json"}}
    assert bundle_references(manifest, "m") == [("lib/cpu/model.tar", "m libs.cpu.tar"),
                                                ("MiniCPM.mlpackage", "m coreml.package"),
                                                ("vision/vision-config.json", "m vision.config")]


def test_edited_metadata_is_caught_by_the_digest(bundle):
    rewrite_manifest(bundle, lambda m: m["quality"].update(ppl_int4=31.0), restamp=False)
    assert verify_bundle(bundle) == [f"{bundle / 'manifest.json'}: edited after export (manifest_sha256 does not "
                                     f"match its content)"]


def test_ios_bundle_spec_version_functions_and_coremltools(tmp_path):
    from tests.support.cli import cli
    from tests.support.release_bundles import assemble_ios_bundle

    b = assemble_ios_bundle(tmp_path / "ok")
    assert verify_bundle(b) == []
    r = cli("verify", b, timeout=300)             # no coremltools import noise ("Failed to load ...")
    assert r.returncode == 0 and "Failed to load" not in r.stderr + r.stdout, r.stderr
    b = assemble_ios_bundle(tmp_path / "old", {"minimum_deployment_target": "iOS17",
                                               "functions": {"prefill": {}, "decode": {}}})
    spec = b / "M.mlpackage" / "Data" / "com.apple.CoreML" / "model.mlmodel"
    assert verify_bundle(b) == [
        f"{spec}: Core ML specification version 9 does not load on iOS17 (its maximum is 8)",
        f"{spec}: has no function 'decode' (manifest coreml.functions; package has main)",
        f"{spec}: has no function 'prefill' (manifest coreml.functions; package has main)"]
    rewrite_manifest(b, lambda m: (m["versions"].update(coremltools="7.2"), m["coreml"].update(
        minimum_deployment_target="iOS18", functions={"main": {}})))
    assert verify_bundle(b) == [f"{b / 'manifest.json'}: coremltools 7.2 cannot write stateful multifunction "
                                f"packages (need >= 8)"]


def test_vision_libraries_need_the_vision_prefix(tmp_path, libs):
    vision = {"system_lib_prefix": "mcpm_tiny_vision_", "libs": {"cpu": {"so": "lib/cpu/model.so"}}}
    b = assemble_bundle(tmp_path / "v", libs, manifest_extra={"vision": vision})
    assert verify_bundle(b) == [f"{b / 'lib/cpu/model.so'}: no 'mcpm_tiny_vision___tvm_ffi__library_bin' symbol: "
                                f"not a system library with prefix 'mcpm_tiny_vision_' (it has prefix 'mcpm_tiny_')"]
