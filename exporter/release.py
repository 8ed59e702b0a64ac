"""Release builds: export bundles and pack each into one reproducible, versioned archive.

``mcpm-<recipe>-<target>-<scheme>-v<mcpm-export version>.tar.gz`` holding one directory of the same
name. Same inputs -> byte-identical archive: entries sorted, mtime 0, uid/gid 0 with empty owner
names, modes normalized to 0644/0755, gzip header without file name or mtime. Every archive is
written under a temporary name, verified (exporter.verify) and only then renamed into place.
"""
from __future__ import annotations

import gzip
import os
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from . import __version__
from .bundle import normalize_member, sha256_file
from .errors import ExportError
from .progress import Progress
from .recipes import KNOWN_TARGETS, Recipe, get_recipe
from .verify import verify_bundle

SUFFIX = ".tar.gz"


@dataclass(frozen=True)
class ReleaseItem:
    recipe: Recipe
    target: str

    @property
    def name(self) -> str:
        return f"mcpm-{self.recipe.name}-{self.target}-{self.recipe.quantization}-v{__version__}"

    @property
    def family_prefix(self) -> str:
        """Names of every release of this recipe/target, whatever the scheme or version."""
        return f"mcpm-{self.recipe.name}-{self.target}-"


def plan(recipes: list[str], target: str, options: dict | None = None) -> list[ReleaseItem]:
    """Validate the whole request before building anything (recipes, targets, each target's
    ``options[target]`` against each recipe). ``target`` 'all': every target each recipe allows."""
    if not recipes or any(not r.strip() for r in recipes):
        raise ExportError("--model: give one or more recipe names, comma separated")
    if target != "all" and target not in KNOWN_TARGETS:
        raise ExportError(f"--target: unknown target '{target}' (known: {', '.join(KNOWN_TARGETS)}, all)")
    from .api import check_export

    items = []
    for name in dict.fromkeys(r.strip() for r in recipes):
        rec = get_recipe(name)
        wanted = [t for t in KNOWN_TARGETS if t in rec.targets] if target == "all" else [target]
        for t in wanted:
            # unknown / unregistered backend, bad options: fail now, not after other builds
            check_export(t, rec.name, (options or {}).get(t))
            items.append(ReleaseItem(rec, t))
    return items


def conflicts(out: Path, items: list[ReleaseItem]) -> list[Path]:
    """Existing archives/bundles in ``out`` that a release of ``items`` would replace or shadow."""
    if not out.is_dir():
        return []
    found = []
    for p in sorted(out.iterdir()):
        if any(p.name.startswith(it.family_prefix) and (p.name.endswith(SUFFIX) or p.is_dir()) for it in items):
            found.append(p)
    return found


def pack(bundle: Path, archive: Path, top: str) -> None:
    """Reproducible .tar.gz of ``bundle`` as ``top/...`` (regular files and directories only)."""
    entries = [bundle] + sorted(bundle.rglob("*"), key=lambda p: p.relative_to(bundle).as_posix())
    with open(archive, "wb") as raw, \
            gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=6) as gz, \
            tarfile.open(fileobj=gz, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for p in entries:
            if p.is_symlink() or not (p.is_file() or p.is_dir()):
                raise ExportError(f"{p}: only regular files and directories can be released")
            rel = p.relative_to(bundle).as_posix()
            arcname = top if rel == "." else f"{top}/{rel}"
            info = normalize_member(tar.gettarinfo(str(p), arcname))
            if p.is_file():
                with open(p, "rb") as f:
                    tar.addfile(info, f)
            else:
                tar.addfile(info)


def release(recipes: list[str], target: str, out: str | Path = "release", force: bool = False,
            progress: Progress | None = None, checkpoint: str | Path | None = None,
            options: dict | None = None) -> list[dict]:
    """Build, pack and verify every requested bundle; [{"archive", "sha256", "size", ...}] per archive.
    ``options``: target name -> that target's Options. Targets whose plans quantize alike (android and
    harmony) share one quantization (api.export ``reuse``)."""
    from . import api

    progress = progress or Progress(quiet=True)
    out = Path(out)
    options = options or {}
    items = plan(recipes, target, options)
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out}: exists and is not a directory")
    old = conflicts(out, items)
    if old and not force:
        raise ExportError(f"--out {out}: already holds {old[0].name}" + (f" (+{len(old) - 1} more)" if len(old) > 1
                          else "") + "; remove it or pass --force to replace it")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ExportError(f"--out {out}: cannot create ({e.strerror})") from None
    results = []
    quantized: api.QuantizedCache = {}
    for i, it in enumerate(items):
        if i and items[i - 1].recipe.name != it.recipe.name:
            quantized = {}       # items come grouped by recipe: free the previous recipe's weights
        progress.log(f"[bold]{it.name}[/]")
        with tempfile.TemporaryDirectory(dir=out, prefix=f".{it.name}.partial-") as tmp:
            bundle = api.export(it.target, it.recipe.name, checkpoint, Path(tmp) / it.name, progress=progress,
                                options=options.get(it.target), reuse=quantized)
            archive = Path(tmp) / (it.name + SUFFIX)
            with progress.stage(f"pack {it.name}{SUFFIX}"):
                pack(bundle, archive, it.name)
            with progress.stage("verify archive"):
                problems = verify_bundle(archive)
                if problems:
                    raise ExportError(f"{it.name}{SUFFIX}: fresh archive does not verify: {problems[0]}")
            for p in conflicts(out, [it]):
                shutil.rmtree(p) if p.is_dir() else p.unlink()
            final = out / (it.name + SUFFIX)
            os.replace(archive, final)
        digest = sha256_file(final)
        progress.log(f"{final}  sha256 {digest}")
        results.append({"archive": str(final), "recipe": it.recipe.name, "target": it.target,
                        "quantization": it.recipe.quantization, "version": __version__, "sha256": digest,
                        "size": final.stat().st_size})
    return results
