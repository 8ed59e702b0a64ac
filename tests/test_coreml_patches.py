"""targets/coreml/patches.py: every coremltools patch is declared, applied only inside patched(),
undone on exit (also on error), and refused for a coremltools other than the pinned one."""
import importlib
import tomllib
from pathlib import Path

import pytest

from exporter.errors import ExportError
from targets.coreml import patches


def _current():
    out = []
    for p in patches.PATCHES:
        obj, name = patches._owner(p)
        out.append(vars(obj)[name])
    return out


def test_pinned_version_is_the_projects_pin():
    project = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())
    assert f"coremltools=={patches.PINNED_VERSION}" in project["project"]["dependencies"]
    assert importlib.import_module("coremltools").__version__ == patches.PINNED_VERSION


def test_patches_apply_inside_and_are_undone_on_exit():
    before = _current()
    with patches.patched():
        inside = _current()
        assert all(a is not b for a, b in zip(before, inside))
        with patches.patched():            # nested use (convert_function inside build_mlpackage)
            pass
        assert all(a is b for a, b in zip(_current(), inside))
    assert all(a is b for a, b in zip(before, _current()))
    with pytest.raises(RuntimeError, match="boom"):
        with patches.patched():
            raise RuntimeError("boom")
    assert all(a is b for a, b in zip(before, _current()))


def test_wrong_version_is_one_clear_error(monkeypatch):
    import coremltools
    before = _current()
    monkeypatch.setattr(coremltools, "__version__", "8.3")
    with pytest.raises(ExportError, match=r"coremltools 8\.3 is installed.*coremltools==9\.0") as e:
        with patches.patched():
            pass
    assert "\n" not in str(e.value)
    assert all(a is b for a, b in zip(before, _current()))
