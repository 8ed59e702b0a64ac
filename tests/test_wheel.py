"""The wheel works: `pip wheel .` then a non-editable install in a fresh venv (system site-packages for
the pinned dependencies, --no-deps: offline) gives an `mcpm-export` with its recipes and the embedded
`tiny` model, run from a directory outside the source tree."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(cmd, cwd, timeout=600):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    res = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{cmd}: {res.stdout[-2000:]}\n{res.stderr[-2000:]}"
    return res.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"                                   # build from a copy: setuptools writes build/
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for rel in filter(None, files.decode().split("\0")):
        if (ROOT / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            (src / rel).write_bytes((ROOT / rel).read_bytes())
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp / "dist", src],
         tmp)
    (wheel,) = (tmp / "dist").glob("mcpm_export-*.whl")
    _run([sys.executable, "-m", "venv", "--system-site-packages", tmp / "venv"], tmp)
    _run([tmp / "venv" / "bin" / "python", "-m", "pip", "install", "-q", "--no-deps", wheel], tmp)
    run = tmp / "run"
    run.mkdir()
    return tmp / "venv" / "bin", run


@pytest.mark.slow
def test_installed_wheel_has_recipes_model_and_exports(installed):
    bin_dir, run = installed
    where = _run([bin_dir / "python", "-c", "import exporter, recipes; print(exporter.__file__, recipes.__file__)"],
                 run)
    assert all("/venv/lib/" in line for line in where.split()), where      # not the source tree
    recipes = json.loads(_run([bin_dir / "mcpm-export", "recipes", "--json"], run))
    assert {"tiny", "sft-int4", "v2-int4"} <= set(recipes)
    gen = json.loads(_run([bin_dir / "mcpm-export", "generate", "--prompt", "def hello", "--max-new-tokens", "8",
                           "--json"], run))
    assert len(gen["tokens"]) == 8 and gen["text"]
    out = run / "tiny-android"
    _run([bin_dir / "mcpm-export", "android", "--model", "tiny", "--out", out], run, timeout=1800)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["recipe"] == "tiny" and manifest["quantization"]["quantizer"] == "gptq"
    assert (out / "lib" / "cpu" / "model.tar").is_file() and (out / "runner" / "mcpm-run").is_file()
