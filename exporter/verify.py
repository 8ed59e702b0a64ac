"""Verify a finished bundle (directory) or release archive (.tar.gz) before anything uses it.

Checks, one problem line each:
  - manifest.json schema: required keys and their types (SCHEMA_KEYS below)
  - every file against the manifest's sha256 and size (exporter.bundle.check_files)
  - android/harmony: the system-lib symbol prefix recorded in the manifest is the one the recipe
    implies and is actually defined in the aarch64 objects of lib/*/model.tar and lib/*/model.so;
    every model library is an ELF for the right machine (aarch64 on the phone, x86_64 for lib/host)
  - the stamped tool versions match what the bundle needs: the TVM that compiled the model library is
    the TVM runtime the bundled runner carries (runner/BUILD.json) and, for `mcpm-export run`
    (host_run), the installed one; an ios bundle's .mlpackage spec version loads on the stated minimum
    iOS, has the functions the manifest documents, and was written by a coremltools >= 8.

``verify_bundle(path) -> list[str]`` returns the problems; ``require_verified(path)`` raises ExportError.
"""
from __future__ import annotations

import json
import logging
import re
import struct
import tarfile
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .bundle import DIGEST_KEY, MANIFEST, SCHEMA, check_files, manifest_digest, sha256_file
from .errors import ExportError
from .recipes import KNOWN_TARGETS

# key -> the type the manifest must hold there
SCHEMA_KEYS = {
    "schema": str, "mcpm_export_version": str, "recipe": str, "target": str, "quantization": dict,
    "quality": dict, "source": dict, "versions": dict, "files": dict,
}
TVM_KEYS = {"system_lib_prefix": str, "libs": dict, "triple": str, "backends": list}
TRIPLES = {"android": "aarch64-linux-android", "harmony": "aarch64-linux-ohos"}   # targets/tvm/pipeline.py
TVM_TARGETS = tuple(TRIPLES)
ELF_MACHINES = {183: "aarch64", 62: "x86_64"}
# the module blob a TVM system library registers under its prefix (what system_lib(prefix) looks up)
LIBRARY_BIN = "__tvm_ffi__library_bin"
# Core ML specification version each iOS release loads (coremltools.target.iOS<N>.value)
IOS_SPEC_VERSION = {13: 4, 14: 5, 15: 6, 16: 7, 17: 8, 18: 9, 26: 10}
COREMLTOOLS_MIN_MAJOR = 8        # Core ML states + multifunction packages
SHA256 = re.compile(r"[0-9a-f]{64}")
CHAT_CONFIG = "mlc-chat-config.json"
# Keys whose string value (its first word), or list of strings, names a file or folder of the bundle,
# wherever they sit in manifest.json or mlc-chat-config.json (libs.cpu.tar, coreml.package, runner.path,
# vision.config, model_lib.params, tokenizer_files, ...). A value that is not path-like (no "/" or ".",
# e.g. model_lib as a library name) is not a reference.
REFERENCE_KEYS = ("tar", "so", "source", "path", "package", "config", "params", "file", "tokenizer_files",
                  "model_lib")
# top-level sections that describe provenance, not the bundle's contents
PROVENANCE_KEYS = ("files", "quality", "source", "versions", "model", DIGEST_KEY)
PATH_LIKE = re.compile(r"[\w.+-]+(/[\w.+-]+)*/?")


# ---------------------------------------------------------------- ELF symbol tables (pure Python)

def elf_symbols(data: bytes, where: str) -> tuple[str, list[str]]:
    """(machine, names of the defined global/weak symbols) of a 64-bit little-endian ELF image.

    Reads .symtab and .dynsym; raises ExportError when ``data`` is not such an ELF."""
    if data[:4] != b"\x7fELF" or len(data) < 64:
        raise ExportError(f"{where}: not an ELF file")
    if data[4] != 2 or data[5] != 1:
        raise ExportError(f"{where}: not a 64-bit little-endian ELF")
    machine = struct.unpack_from("<H", data, 18)[0]
    shoff, = struct.unpack_from("<Q", data, 40)
    shentsize, shnum = struct.unpack_from("<HH", data, 58)
    try:
        sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
        names = []
        for sh in sections:
            if sh[1] not in (2, 11):          # SHT_SYMTAB, SHT_DYNSYM
                continue
            _, _, _, _, off, size, link, _, _, entsize = sh
            stroff, strsize = sections[link][4], sections[link][5]
            strtab = data[stroff:stroff + strsize]
            for pos in range(off, off + size, entsize or 24):
                st_name, st_info, _, st_shndx = struct.unpack_from("<IBBH", data, pos)
                if st_shndx == 0 or (st_info >> 4) not in (1, 2):     # undefined, or local
                    continue
                end = strtab.index(b"\0", st_name)
                names.append(strtab[st_name:end].decode("utf-8", "replace"))
    except (struct.error, IndexError, ValueError):
        raise ExportError(f"{where}: truncated or corrupt ELF") from None
    return ELF_MACHINES.get(machine, f"machine {machine}"), names


def library_symbols(path: Path) -> list[tuple[str, str, list[str]]]:
    """[(member, machine, defined symbols)] of a .so or of every .o inside a .tar."""
    if path.suffix != ".tar":
        return [(path.name, *elf_symbols(path.read_bytes(), str(path)))]
    out = []
    try:
        with tarfile.open(path) as tar:
            for m in sorted(tar.getmembers(), key=lambda m: m.name):
                if m.isfile() and m.name.endswith(".o"):
                    out.append((m.name, *elf_symbols(tar.extractfile(m).read(), f"{path}:{m.name}")))
    except tarfile.TarError as e:
        raise ExportError(f"{path}: not a readable tar ({e})") from None
    if not out:
        raise ExportError(f"{path}: holds no .o objects")
    return out


# ---------------------------------------------------------------- checks

def expected_prefix(recipe: str, backend: str = "cpu") -> str:
    """DESIGN.md: ``mcpm_<recipe>_`` (cpu) / ``mcpm_<recipe>_<backend>_`` (opencl), non-alphanumerics
    replaced by ``_``: one app can link the cpu and opencl libraries together."""
    return "mcpm_" + re.sub(r"[^0-9A-Za-z]", "_", recipe) + "_" + ("" if backend == "cpu" else backend + "_")


def check_schema(manifest: dict, label: str = MANIFEST) -> list[str]:
    def typed(keys: dict, where: dict, label: str) -> list[str]:
        bad = []
        for key, typ in keys.items():
            if key not in where:
                bad.append(f"{label}: required key '{key}' is missing")
            elif not isinstance(where[key], typ) or isinstance(where[key], bool):
                bad.append(f"{label}: key '{key}' must be a {getattr(typ, '__name__', typ)}, "
                           f"not {type(where[key]).__name__}")
        return bad

    if not isinstance(manifest, dict):
        return [f"{label}: must be a JSON object"]
    problems = typed(SCHEMA_KEYS, manifest, label)
    if isinstance(manifest.get("schema"), str) and manifest["schema"] != SCHEMA:
        problems.append(f"{label}: schema '{manifest['schema']}' is not '{SCHEMA}'")
    if isinstance(manifest.get("target"), str) and manifest["target"] not in KNOWN_TARGETS:
        problems.append(f"{label}: unknown target '{manifest['target']}'")
    if isinstance(manifest.get("quantization"), dict) and not isinstance(manifest["quantization"].get("scheme"), str):
        problems.append(f"{label}: quantization.scheme must be a string")
    if isinstance(manifest.get("source"), dict) and \
            not isinstance(manifest["source"].get("checkpoint_fingerprint"), str):
        problems.append(f"{label}: source.checkpoint_fingerprint must be a string")
    if isinstance(manifest.get("versions"), dict):
        if not all(isinstance(v, str) for v in manifest["versions"].values()):
            problems.append(f"{label}: versions must map tool names to version strings")
        elif manifest["versions"].get("mcpm_export") != manifest.get("mcpm_export_version"):
            problems.append(f"{label}: versions.mcpm_export != mcpm_export_version")
    for rel, meta in (manifest.get("files") or {}).items() if isinstance(manifest.get("files"), dict) else ():
        if rel.startswith("/") or ".." in rel.split("/") or rel == MANIFEST:
            problems.append(f"{label}: files: unsafe or reserved path '{rel}'")
        elif not (isinstance(meta, dict) and isinstance(meta.get("sha256"), str) and SHA256.fullmatch(meta["sha256"])
                  and isinstance(meta.get("size"), int) and meta["size"] >= 0):
            problems.append(f"{label}: files['{rel}'] must be {{sha256: 64 hex digits, size: int >= 0}}")
    if manifest.get("target") in TVM_TARGETS:
        problems += typed(TVM_KEYS, manifest, f"{label} ({manifest['target']})")
    return problems


def inside(rel) -> bool:
    """``rel`` is a non-empty relative path that stays inside the bundle (and that a filesystem takes)."""
    return isinstance(rel, str) and bool(rel.strip("/")) and not rel.startswith("/") and ".." not in rel.split("/") \
        and "\0" not in rel and all(len(part.encode("utf-8", "replace")) <= 255 for part in rel.split("/"))


def bundle_references(doc, label: str) -> list[tuple[str, str]]:
    """[(bundle-relative path, where it is named)] for every file reference in a bundle's JSON
    document (manifest.json, mlc-chat-config.json): see REFERENCE_KEYS."""
    refs: list[tuple[str, str]] = []

    def walk(node, where: str, top: bool) -> None:
        if isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{where}[{i}]", False)
            return
        if not isinstance(node, dict):
            return
        for key, v in node.items():
            if top and key in PROVENANCE_KEYS:
                continue
            here = f"{where}.{key}" if where else str(key)
            values = [(f"{here}[{i}]", x) for i, x in enumerate(v)] if isinstance(v, list) else [(here, v)]
            if key in REFERENCE_KEYS and all(isinstance(x, str) for _, x in values):
                for at, x in values:
                    word = x.split()[0] if x.split() else ""
                    if PATH_LIKE.fullmatch(word) and ("/" in word or "." in word) and word not in (".", ".."):
                        refs.append((word.rstrip("/"), f"{label} {at}"))
            else:
                walk(v, here, False)

    walk(doc, "", True)
    return refs


def check_references(bundle: Path, manifest: dict, files: dict) -> list[str]:
    """Every file or folder manifest.json or mlc-chat-config.json refers to exists and is hashed in
    ``files`` (a folder: at least one hashed file under it)."""
    refs = bundle_references(manifest, MANIFEST)
    chat = bundle / CHAT_CONFIG
    if chat.is_file():
        try:
            refs += bundle_references(json.loads(chat.read_text()), CHAT_CONFIG)
        except (ValueError, RecursionError) as e:
            return [f"{chat}: not valid JSON ({e})"]
    problems = []
    for rel, where in refs:
        if not inside(rel):
            problems.append(f"{where}: unsafe path '{rel}'")
        elif rel in files or any(k.startswith(rel + "/") for k in files):
            continue      # hashed; check_files reports it if it is missing or differs
        elif not (bundle / rel).exists():
            problems.append(f"{bundle / rel}: missing ({where} refers to it)")
        else:
            problems.append(f"{bundle / rel}: not hashed in the manifest ({where} refers to it)")
    return sorted(set(problems))


def check_tvm_libraries(bundle: Path, manifest: dict) -> list[str]:
    """Triple, symbol prefix and ELF machine of every model library the manifest lists (and of the
    vision encoder's libraries in a vision bundle, prefix ``<prefix>vision_``)."""
    prefix, recipe, mf = manifest["system_lib_prefix"], manifest["recipe"], bundle / MANIFEST
    problems = []
    if manifest["triple"] != TRIPLES[manifest["target"]]:
        problems.append(f"{mf}: triple '{manifest['triple']}' is not the {manifest['target']} triple "
                        f"'{TRIPLES[manifest['target']]}'")
    if prefix != expected_prefix(recipe):
        problems.append(f"{mf}: system_lib_prefix '{prefix}' does not match recipe '{recipe}' "
                        f"(expected '{expected_prefix(recipe)}')")
    conf_path = bundle / "mlc-chat-config.json"
    try:
        conf = json.loads(conf_path.read_text())
        model_lib, conf_libs = conf["model_lib"], conf["mcpm"]["libs"]
        if not isinstance(model_lib, str):
            problems.append(f"{conf_path}: model_lib must be a string (MLC's system-lib name), got {model_lib!r}")
        elif not any(isinstance(lib, dict) and lib.get("prefix") == model_lib + "_" for lib in conf_libs.values()):
            problems.append(f"{conf_path}: model_lib '{model_lib}' names none of the bundle's libraries")
        for backend, lib in manifest["libs"].items():
            if isinstance(lib, dict) and lib.get("prefix") != conf_libs.get(backend, {}).get("prefix"):
                problems.append(f"{conf_path}: mcpm.libs.{backend}.prefix "
                                f"'{conf_libs.get(backend, {}).get('prefix')}' != manifest '{lib.get('prefix')}'")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        problems.append(f"{conf_path}: missing, or has no model_lib / mcpm.libs")
    problems += check_libs(bundle, manifest["libs"], recipe, "libs")
    vision = manifest.get("vision")
    if isinstance(vision, dict) and isinstance(vision.get("libs"), dict):
        if vision.get("system_lib_prefix") != prefix + "vision_":
            problems.append(f"{mf}: vision.system_lib_prefix '{vision.get('system_lib_prefix')}' is not "
                            f"'{prefix}vision_'")
        problems += check_libs(bundle, vision["libs"], recipe, "vision.libs", prefix + "vision_")
    return problems


def check_libs(bundle: Path, libs: dict, recipe: str, label: str, prefix: str | None = None) -> list[str]:
    """ELF machine and system-lib prefix of each listed library: ``prefix`` when given, else the
    library's own "prefix", which must be expected_prefix(recipe, backend)."""
    problems = []
    for backend, lib in sorted(libs.items()):
        want_prefix = prefix
        if want_prefix is None and backend != "host":
            want_prefix = expected_prefix(recipe, backend)
            if isinstance(lib, dict) and lib.get("prefix", want_prefix) != want_prefix:
                problems.append(f"{bundle / MANIFEST}: {label}.{backend}.prefix '{lib.get('prefix')}' is not "
                                f"'{want_prefix}'")
        want_machine = "x86_64" if backend == "host" else "aarch64"
        for kind in ("tar", "so"):
            rel = lib.get(kind) if isinstance(lib, dict) else None
            if not inside(rel) or not (bundle / rel).is_file():
                continue      # missing or unsafe: reported by check_references
            try:
                members = library_symbols(bundle / rel)
            except ExportError as e:
                problems.append(str(e))
                continue
            for member, machine, _ in members:
                if machine != want_machine:
                    where = f"{bundle / rel}" + (f":{member}" if kind == "tar" else "")
                    problems.append(f"{where}: {machine} code, {label}.{backend} needs {want_machine}")
            if backend == "host":
                continue      # the host build is a plain (non system-lib) shared library
            symbols = {s for _, _, syms in members for s in syms}
            if want_prefix + LIBRARY_BIN not in symbols:
                others = sorted(s[:-len(LIBRARY_BIN)] for s in symbols if s.endswith(LIBRARY_BIN))
                seen = f" (it has prefix {', '.join(repr(o) for o in others)})" if others else ""
                problems.append(f"{bundle / rel}: no '{want_prefix}{LIBRARY_BIN}' symbol: not a system library "
                                f"with prefix '{want_prefix}'{seen}")
    return problems


def check_versions(bundle: Path, manifest: dict) -> list[str]:
    versions, target = manifest["versions"], manifest["target"]
    problems = []
    if target in TVM_TARGETS:
        if "apache-tvm" not in versions:
            problems.append(f"{bundle / MANIFEST}: versions has no 'apache-tvm' (the TVM that compiled the model library)")
        build = bundle / "runner" / "BUILD.json"
        if build.is_file():
            try:
                inputs = json.loads(build.read_text())["inputs"]
                wheels = " ".join(str(w) for w in inputs.get("wheels", inputs).keys()) \
                    if isinstance(inputs, dict) else ""
            except (ValueError, KeyError, TypeError):
                return problems + [f"{build}: unreadable runner build record"]
            for dist, wheel in (("apache-tvm", "apache_tvm-"), ("apache-tvm-ffi", "apache_tvm_ffi-")):
                have = versions.get(dist)
                if have and f"{wheel}{have}-" not in wheels:
                    problems.append(f"{build}: runner's TVM runtime is not {dist} {have}, the version that "
                                    f"compiled the model library")
    if target == "ios":
        problems += check_coreml(bundle, manifest)
    return problems


def check_coreml(bundle: Path, manifest: dict) -> list[str]:
    """The .mlpackage's spec against the manifest: Core ML specification version vs the stated
    minimum iOS, the functions the manifest documents, and a coremltools new enough to have written it."""
    versions, info = manifest["versions"], manifest.get("coreml")
    mf = bundle / MANIFEST
    if "coremltools" not in versions:
        return [f"{mf}: versions has no 'coremltools' (the converter of the .mlpackage)"]
    if not isinstance(info, dict) or not inside(info.get("package")):
        return [f"{mf}: ios bundle without coreml.package (a folder inside the bundle)"]
    problems = []
    if _major(versions["coremltools"]) < COREMLTOOLS_MIN_MAJOR:
        problems.append(f"{mf}: coremltools {versions['coremltools']} cannot write stateful multifunction "
                        f"packages (need >= {COREMLTOOLS_MIN_MAJOR})")
    spec_path = bundle / info["package"] / "Data" / "com.apple.CoreML" / "model.mlmodel"
    logging.getLogger("coremltools").setLevel(logging.ERROR)   # its import-time "Failed to load ..." noise
    try:
        from coremltools.proto import Model_pb2
    except ImportError:
        return problems       # no protobuf reader here; file hashes still cover the package
    spec = Model_pb2.Model()
    try:
        spec.ParseFromString(spec_path.read_bytes())
    except Exception as e:  # noqa: BLE001  (FileNotFoundError, protobuf's DecodeError)
        return problems + [f"{spec_path}: not a readable Core ML model spec ({type(e).__name__})"]
    ios = re.fullmatch(r"iOS(\d+)", str(info.get("minimum_deployment_target", "")))
    limit = IOS_SPEC_VERSION.get(int(ios.group(1))) if ios else None
    if limit is None:
        problems.append(f"{mf}: coreml.minimum_deployment_target '{info.get('minimum_deployment_target')}' "
                        f"is not a known iOS version")
    elif spec.specificationVersion > limit:
        problems.append(f"{spec_path}: Core ML specification version {spec.specificationVersion} does not load "
                        f"on {info['minimum_deployment_target']} (its maximum is {limit})")
    have = {f.name for f in spec.description.functions} or {"main"}
    for fn in sorted(set(info.get("functions") or {}) - have):
        problems.append(f"{spec_path}: has no function '{fn}' (manifest coreml.functions; package has "
                        f"{', '.join(sorted(have))})")
    return problems


def _major(version: str) -> int:
    m = re.match(r"\d+", version)
    return int(m.group(0)) if m else 0


def runner_files(bundle: Path, manifest: dict) -> dict:
    """A runner installed after the bundle was finalized (runner.build.install_runner) is not in the
    manifest; its files are checked against the sha256 table of its own runner/BUILD.json instead."""
    build = bundle / "runner" / "BUILD.json"
    if "runner/BUILD.json" in manifest["files"] or not build.is_file():
        return {}
    try:
        files = json.loads(build.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return {}        # then they show up as unlisted files
    table = {"runner/BUILD.json": {"sha256": sha256_file(build), "size": build.stat().st_size}}
    for rel, digest in files.items():
        path = bundle / "runner" / rel
        table[f"runner/{rel}"] = {"sha256": digest, "size": path.stat().st_size
                                  if inside(rel) and path.is_file() else -1}
    return table


def host_runtime_problems(bundle: Path, manifest: dict) -> list[str]:
    """The installed TVM must be the one that compiled lib/host (what `mcpm-export run` loads)."""
    from importlib import metadata
    problems = []
    for dist in ("apache-tvm", "apache-tvm-ffi"):
        want = manifest.get("versions", {}).get(dist)
        try:
            have = metadata.version(dist)
        except metadata.PackageNotFoundError:
            have = None
        if want and have != want:
            problems.append(f"{bundle}: compiled with {dist} {want}, this runtime is {have or 'not installed'} "
                            f"(pip install {dist}=={want})")
    return problems


# ---------------------------------------------------------------- archives and the entry points

@contextmanager
def opened(path: Path):
    """A bundle directory, or a release archive unpacked (safely) into a temporary directory."""
    path = Path(path)
    if path.is_dir():
        yield path
        return
    if not path.is_file():
        raise ExportError(f"{path}: no such bundle or archive")
    with tempfile.TemporaryDirectory(prefix=".mcpm-verify-") as tmp:
        try:
            with tarfile.open(path, "r:*") as tar:
                members = tar.getmembers()
                tops = {m.name.split("/")[0] for m in members}
                if len(tops) != 1:
                    raise ExportError(f"{path}: archive must hold exactly one bundle directory "
                                      f"(found {len(tops)} top-level entries)")
                tar.extractall(tmp, filter="data")
        except tarfile.FilterError as e:      # path traversal, absolute paths, links out of the bundle
            raise ExportError(f"{path}: unsafe archive member, refused ({e})") from None
        except (tarfile.TarError, EOFError, OSError, ValueError) as e:
            raise ExportError(f"{path}: truncated or unreadable archive ({e})") from None
        top = tops.pop()
        stem = path.name.removesuffix(".tar.gz").removesuffix(".tgz").removesuffix(".tar")
        if top != stem:
            raise ExportError(f"{path}: archive holds '{top}/', expected '{stem}/' (renamed archive?)")
        yield Path(tmp) / top


def _verify_dir(bundle: Path, host_run: bool) -> list[str]:
    try:
        manifest = json.loads((bundle / MANIFEST).read_text())
    except FileNotFoundError:
        return [f"{bundle}: not a bundle (no {MANIFEST})"]
    except (ValueError, RecursionError) as e:
        return [f"{bundle / MANIFEST}: not valid JSON ({e})"]
    problems = check_schema(manifest, str(bundle / MANIFEST))
    if problems:
        return problems       # the remaining checks need a well-formed manifest
    problems += digest_problems(bundle, manifest)
    files = {**runner_files(bundle, manifest), **manifest["files"]}
    problems += check_files(bundle, {**manifest, "files": files})
    problems += check_references(bundle, manifest, files)
    if manifest["target"] in TVM_TARGETS:
        problems += check_tvm_libraries(bundle, manifest)
        if host_run:
            problems += host_runtime_problems(bundle, manifest)
    problems += check_versions(bundle, manifest)
    return problems


def digest_problems(bundle: Path, manifest: dict) -> list[str]:
    """manifest.json's own digest (exporter.bundle.manifest_digest): edited metadata is caught."""
    mf = bundle / MANIFEST
    if not isinstance(manifest.get(DIGEST_KEY), str):
        return [f"{mf}: no {DIGEST_KEY} (written by an older mcpm-export, or edited)"]
    try:
        digest = manifest_digest(manifest)
    except ValueError:
        return [f"{mf}: holds NaN or Infinity (not strict JSON)"]
    if digest != manifest[DIGEST_KEY]:
        return [f"{mf}: edited after export ({DIGEST_KEY} does not match its content)"]
    return []


def verify_bundle(path: str | Path, host_run: bool = False) -> list[str]:
    """Every problem of a bundle directory or release archive (empty list: it verifies).
    ``host_run``: also require the installed TVM to be the one the bundle was compiled with."""
    try:
        with opened(Path(path)) as bundle:
            problems = _verify_dir(bundle, host_run)
            if bundle != Path(path):    # name files inside an archive as ARCHIVE:DIR/FILE, not the temp dir
                problems = [p.replace(str(bundle), f"{path}:{bundle.name}") for p in problems]
            return problems
    except ExportError as e:
        return [str(e)]


def require_verified(path: str | Path, host_run: bool = False) -> None:
    """Raise ExportError naming the first problems when the bundle does not verify."""
    problems = verify_bundle(path, host_run)
    if problems:
        more = f" (+{len(problems) - 3} more; run `mcpm-export verify {path}`)" if len(problems) > 3 else ""
        raise ExportError(f"{path}: bundle does not verify: " + "; ".join(problems[:3]) + more)
