"""Imports run one way: core -> models -> quantization -> bundle -> targets -> api -> cli.

Walks every import statement (module level and inside functions) of the project's packages and fails
on an import of a higher layer or on an import cycle between modules."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("exporter", "targets", "runner", "device_tests")
LAYERS = ("core", "models", "quantization", "bundle", "targets", "api", "cli")
# module prefix -> layer; the longest matching prefix wins. A module no prefix matches fails the test.
LAYER_OF = {
    "exporter": "core",                      # errors, config, recipes, checkpoint, names, tokenizer, chat, ...
    "exporter.vision": "core",               # slicing, preprocess, config, names, loader
    "exporter.model": "models",
    "exporter.vision.model": "models",
    "exporter.vision.onnx_ref": "models",
    "exporter.vision.multimodal": "models",
    "exporter.vision.loader": "models",
    "exporter.quant": "quantization",
    "exporter.quantizers": "quantization",
    "exporter.streaming": "quantization",
    "exporter.quality": "quantization",
    "exporter.bundle": "bundle",
    "exporter.verify": "bundle",
    "device_tests": "bundle",                # the adb harness: core and bundle only
    "targets": "targets",
    "runner": "targets",                     # building the on-device runner is a target concern
    "exporter.api": "api",
    "exporter.release": "api",
    "exporter.doctor": "api",
    "exporter.cli": "cli",
}
# the harness may use only core and bundle modules (plus its own)
HARNESS_MAY_IMPORT = ("core", "bundle")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer(module: str) -> str | None:
    best = None
    for prefix in LAYER_OF:
        if module == prefix or module.startswith(prefix + "."):
            if best is None or len(prefix) > len(best):
                best = prefix
    return LAYER_OF[best] if best else None


def imports(path: Path, modules: set[str]) -> set[str]:
    """Project modules imported anywhere in ``path`` (resolved to the most specific module)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for t in targets:
            while t and t not in modules:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def graph() -> dict[str, set[str]]:
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]
    modules = {module_name(p) for p in files}
    return {module_name(p): imports(p, modules) for p in files}


def test_every_module_has_a_layer():
    assert [m for m in graph() if layer(m) is None] == []


def test_no_upward_import():
    bad = []
    for mod, deps in graph().items():
        for dep in deps:
            if LAYERS.index(layer(dep)) > LAYERS.index(layer(mod)):
                bad.append(f"{mod} ({layer(mod)}) imports {dep} ({layer(dep)})")
            if mod.startswith("device_tests") and not dep.startswith("device_tests") \
                    and layer(dep) not in HARNESS_MAY_IMPORT:
                bad.append(f"{mod} (device harness) imports {dep} ({layer(dep)})")
    assert bad == []


def test_no_import_cycle():
    g = graph()
    # the package __init__ of a module's own package is not an edge back (importing a.b runs a first)
    cycles, state = [], {}

    def visit(node, stack):
        state[node] = 1
        stack.append(node)
        for dep in sorted(g.get(node, ())):
            if node.startswith(dep + "."):
                continue
            if state.get(dep) == 1:
                cycles.append(" -> ".join(stack[stack.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, stack)
        stack.pop()
        state[node] = 2

    for node in sorted(g):
        if node not in state:
            visit(node, [])
    assert cycles == []
