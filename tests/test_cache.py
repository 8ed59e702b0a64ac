"""One cache root: exporter/cache.py reads MCPM_EXPORT_CACHE; no other module picks its own."""
import re
from pathlib import Path

from exporter.cache import CACHE_VARIABLE, cache_dir, cache_root

ROOT = Path(__file__).resolve().parent.parent


def test_cache_root_variable(monkeypatch, tmp_path):
    monkeypatch.setenv(CACHE_VARIABLE, str(tmp_path))
    assert cache_root() == tmp_path and cache_dir("native") == tmp_path / "native"
    monkeypatch.delenv(CACHE_VARIABLE)
    assert cache_root() == Path.home() / ".cache" / "mcpm-export"


def test_no_other_cache_variable_or_path():
    pattern = re.compile(r"(environ(\.get)?|getenv)\W*[\"'](MCPM_CACHE|MCPM_EXPORT_CACHE|XDG_CACHE_HOME)"
                         r"|[\"']\.cache[\"']\s*\)?\s*/\s*[\"']mcpm-export")
    offenders = [str(p.relative_to(ROOT)) for d in ("exporter", "targets", "runner", "device_tests", "bench")
                 for p in (ROOT / d).rglob("*.py")
                 if p.name != "cache.py" and pattern.search(p.read_text())]
    assert offenders == []
