"""The CLI end to end: exit codes and one-line errors."""
import json
import subprocess
import sys

EVAL = "../shared/eval/python-tutorial.txt"


def cli(*args):
    return subprocess.run([sys.executable, "-m", "exporter.cli", *args], capture_output=True, text=True)


def test_eval_json_reports_both_perplexities():
    r = cli("eval", "--model", "tiny", "--text", EVAL, "--windows", "4", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["tokens"] == 2048 and 20 < res["ppl_fp"] < 45
    # int4 costs a little perplexity, never a lot
    assert res["ppl_fp"] < res["ppl_int4"] < res["ppl_fp"] * 1.03


def test_generate_json_is_deterministic():
    a = json.loads(cli("generate", "--prompt", "Lists", "--max-new-tokens", "8", "--json").stdout)
    b = json.loads(cli("generate", "--prompt", "Lists", "--max-new-tokens", "8", "--json").stdout)
    assert a["tokens"] == b["tokens"] and len(a["tokens"]) == 8


def test_missing_checkpoint_is_one_line_and_nonzero(tmp_path):
    r = cli("eval", "--model", "tiny", "--checkpoint", str(tmp_path / "nowhere"), "--text", EVAL)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --checkpoint") and "nowhere" in lines[0]


def test_unknown_recipe_for_export(tmp_path):
    r = cli("android", "--model", "nope", "--out", str(tmp_path / "b"))
    assert r.returncode == 1 and "unknown recipe 'nope'" in r.stderr
    assert not (tmp_path / "b").exists()
