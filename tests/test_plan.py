"""Targets own their plan: typed options validated before the checkpoint is opened, the CLI's flags made
from the options dataclasses, one quantization per distinct plan in a release, and the centre's
manifest keys protected from a target's."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import click
import pytest

import targets
from exporter import api
from exporter import release as release_mod
from exporter.cli import option_flags
from exporter.errors import ExportError
from exporter.quant import SCHEMES
from exporter.recipes import KNOWN_TARGETS, get_recipe
from targets.base import ExportPlan, Quantization, option
from targets.coreml.options import IOSOptions
from targets.tvm.options import TVMOptions

REAL_GET_TARGET = targets.get_target


class FakeBuild:
    """A registered target's real plan; build writes one file and records what it was handed."""

    def __init__(self, real, built: list, extra: dict | None = None, scheme: str | None = None):
        self.real, self.built, self.extra, self.scheme = real, built, extra or {}, scheme
        self.name, self.Options = real.name, real.Options

    def plan(self, recipe, options) -> ExportPlan:
        plan = self.real.plan(recipe, options)
        if self.scheme:     # cheaper quantization (no gate) where the test is not about it
            plan = dataclasses.replace(plan, quantization=Quantization(SCHEMES[self.scheme], "clip"))
        return plan

    def build(self, ctx, staging: Path) -> dict:
        (staging / "weights.txt").write_text(str(len(ctx.quantized.tensors)))
        self.built.append((self.name, ctx.plan, ctx.quantized))
        return dict(self.extra)


def fake_targets(monkeypatch, built: list, **kw) -> None:
    monkeypatch.setattr(targets, "get_target", lambda name: FakeBuild(REAL_GET_TARGET(name), built, **kw))


def test_manifest_key_collision_is_refused(monkeypatch, tmp_path):
    """A target returning a key the centre writes ("quality") fails the export; nothing is finalized."""
    built: list = []
    fake_targets(monkeypatch, built, extra={"quality": {"ppl_int4": 1.0}, "backend": "fake"}, scheme="fp16")
    with pytest.raises(ExportError, match="manifest keys the centre owns: quality"):
        api.export("android", "tiny", out=tmp_path / "b")
    assert len(built) == 1 and not (tmp_path / "b").exists() and list(tmp_path.iterdir()) == []
    fake_targets(monkeypatch, built, extra={"backend": "fake"}, scheme="fp16")
    manifest = json.loads((api.export("android", "tiny", out=tmp_path / "ok") / "manifest.json").read_text())
    assert manifest["backend"] == "fake" and manifest["quantization"]["scheme"] == "fp16"


def test_options_are_validated_before_the_checkpoint_is_opened(monkeypatch, tmp_path):
    def opened(*a, **kw):
        raise AssertionError("the checkpoint was opened")

    monkeypatch.setattr(api, "open_model", opened)
    cases = [("ios", IOSOptions(embedding="int7"), "embedding 'int7': expected one of lut6, int8, int4"),
             ("ios", IOSOptions(deployment_target="iOS16"), "iOS16 is too old"),
             ("ios", TVMOptions(), "options must be IOSOptions, got TVMOptions"),
             ("android", TVMOptions(backend="vulkan"), "--backend 'vulkan': expected one of cpu, opencl, all"),
             ("harmony", TVMOptions(soc="snapdragon9000"), "--soc 'snapdragon9000'")]
    for target, options, message in cases:
        with pytest.raises(ExportError, match=message):
            api.export(target, "tiny", out=tmp_path / "b", options=options)
        with pytest.raises(ExportError, match=message):       # a release checks every item first
            release_mod.plan(["tiny"], "all", {target: options})
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(AssertionError, match="was opened"):   # good options: the checkpoint comes next
        api.export("android", "tiny", out=tmp_path / "b", options=TVMOptions(backend="all"))


def test_release_all_quantizes_once_per_distinct_plan(monkeypatch, tmp_path):
    """tiny for android, harmony and ios: android and harmony plan the same quantization (one run, the
    same weights handed to both builds), ios its own (the palettized embedding): two runs, three archives."""
    built: list = []
    calls: list = []
    real_quantize = api.quantize_source

    def counting(recipe, config, tok, get, names, scheme, *a, **kw):
        calls.append(scheme.name)
        return real_quantize(recipe, config, tok, get, names, SCHEMES["fp16"])   # cheap, same shape of call

    fake_targets(monkeypatch, built, extra={"backend": "fake"})
    monkeypatch.setattr(api, "quantize_source", counting)
    monkeypatch.setattr(release_mod, "verify_bundle", lambda path: [])
    results = release_mod.release(["tiny"], "all", tmp_path / "rel",
                                  options={"android": TVMOptions(backend="opencl"), "ios": IOSOptions()})
    assert [r["target"] for r in results] == ["android", "harmony", "ios"]
    assert sorted(calls) == ["q4f16_e8", "q4f16_lut6"]
    by_target = {name: (plan, qm) for name, plan, qm in built}
    assert by_target["android"][1] is by_target["harmony"][1] is not by_target["ios"][1]
    assert by_target["android"][0].options == TVMOptions(backend="opencl")      # options passed through
    assert by_target["harmony"][0].options == TVMOptions()
    assert all(Path(r["archive"]).is_file() for r in results)


@dataclasses.dataclass(frozen=True)
class ToyOptions:
    level: str = option("low", "How much.", ("low", "high"))
    fast: bool = option(False, "Go fast.")
    name_of_thing: str | None = option(None, "Free text.")
    rows: int | None = option(None, "API only.", cli=False)


def test_cli_flags_are_generated_from_the_options_dataclasses():
    flags = {f.opts[0]: f for f in option_flags(ToyOptions)}
    assert sorted(flags) == ["--fast", "--level", "--name-of-thing"]
    assert list(flags["--level"].type.choices) == ["low", "high"] and flags["--level"].default == "low"
    assert flags["--fast"].is_flag and flags["--name-of-thing"].help == "Free text."
    cmd = click.Command("toy", params=option_flags(ToyOptions), callback=lambda **kw: kw)
    assert cmd.main(["--level", "high", "--fast"], standalone_mode=False) == \
        {"level": "high", "fast": True, "name_of_thing": None}
    for target in KNOWN_TARGETS:              # the registry's light options class is the target's own
        assert REAL_GET_TARGET(target).Options is targets.get_options(target)
    for command, classes in ((t, [targets.get_options(t)]) for t in KNOWN_TARGETS):
        help_text = subprocess.run([sys.executable, "-m", "exporter.cli", command, "--help"],
                                   capture_output=True, text=True).stdout
        for cls in classes:
            for f in dataclasses.fields(cls):
                assert (f"--{f.name.replace('_', '-')}" in help_text) == f.metadata["cli"], (command, f.name)
    release_help = subprocess.run([sys.executable, "-m", "exporter.cli", "release", "--help"],
                                  capture_output=True, text=True).stdout
    for flag in ("--backend", "--soc", "--vision-weights", "--deployment-target", "--embedding", "--ane-head"):
        assert flag in release_help, flag


def test_plans_are_typed_and_cheap():
    """The TVM plan: the recipe's scheme and quantizer, the vision component for V recipes."""
    plan = REAL_GET_TARGET("android").plan(get_recipe("v2-int4"), TVMOptions())
    assert plan.components == ("text", "vision") and plan.quantization.scheme.name == "q4f16_e8"
    assert REAL_GET_TARGET("harmony").plan(get_recipe("tiny"), TVMOptions()).quantization == \
        REAL_GET_TARGET("android").plan(get_recipe("tiny"), TVMOptions(backend="all")).quantization
