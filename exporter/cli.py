"""`mcpm-export`: a thin CLI over exporter.api. Every command prints its resolved settings."""
from __future__ import annotations

import dataclasses
import errno
import json
import signal
import sys
from functools import wraps
from pathlib import Path

import click
from rich.markup import escape
from rich.table import Table

from . import __version__, api
from .errors import ExportError
from .progress import Progress, console, stdout
from .recipes import KNOWN_QUANTIZERS, KNOWN_SCHEMES, KNOWN_TARGETS, get_recipe, load_recipes


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is so that it unwinds like Ctrl-C (staging removed, locks released)."""


def _terminate(_signum, _frame) -> None:
    raise Terminated()


def user_errors(fn):
    """ExportError (and a full disk) -> one line on stderr, exit 1; Ctrl-C / SIGINT -> exit 130;
    SIGTERM -> the same clean unwinding, exit 143."""
    @wraps(fn)
    def wrapper(*a, **kw):
        signal.signal(signal.SIGTERM, _terminate)
        try:
            return fn(*a, **kw)
        except ExportError as e:
            fail(str(e))
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            fail(f"{e.filename or 'a write'}: no space left on the device")
        except Terminated:
            fail("terminated", status=128 + signal.SIGTERM)
        except KeyboardInterrupt:
            fail("interrupted", status=130)
    return wrapper


def fail(msg: str, status: int = 1) -> None:
    console.print(f"[red]error:[/] {escape(msg)}", soft_wrap=True)
    sys.exit(status)


def show_settings(title: str, **settings) -> None:
    table = Table(title=title, show_header=False, title_justify="left")
    for k, v in settings.items():
        if v is not None:
            table.add_row(k, str(v))
    console.print(table)


@click.group()
@click.version_option(__version__, prog_name="mcpm-export")
def main():
    """MiniCPM checkpoints to phone-ready bundles (Android, HarmonyOS, iOS)."""


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@user_errors
def recipes(as_json):
    """List the model variants (recipes/*.toml)."""
    recs = load_recipes()
    if as_json:
        click.echo(json.dumps({n: {"repo_id": r.repo_id, "family": r.family, "quantization": r.quantization,
                                   "context_window": r.context_window, "prefill_chunk": r.prefill_chunk,
                                   "targets": list(r.targets), **r.dims} for n, r in recs.items()}, indent=2))
        return
    table = Table(title="mcpm-export recipes")
    for col in ("name", "repo id", "family", "hidden x layers", "vocab", "scheme", "context", "chunk", "targets"):
        table.add_column(col)
    for n, r in recs.items():
        table.add_row(n, r.repo_id, r.family, f"{r.dims.get('hidden_size')} x {r.dims.get('num_hidden_layers')}",
                      str(r.dims.get("vocab_size")), r.quantization, str(r.context_window),
                      str(r.prefill_chunk), ",".join(r.targets))
    stdout.print(table)


@main.command()
@click.option("--model", "recipe", default="tiny", show_default=True)
@click.option("--checkpoint", type=click.Path(), default=None)
@click.option("--prompt", required=True)
@click.option("--max-new-tokens", default=32, show_default=True)
@click.option("--quant", type=click.Choice(["int4"]), default=None, help="Run the recipe's quantized weights.")
@click.option("--json", "as_json", is_flag=True)
@user_errors
def generate(recipe, checkpoint, prompt, max_new_tokens, quant, as_json):
    """Greedy generation with the PyTorch reference model."""
    res = api.generate(recipe, prompt, max_new_tokens, checkpoint, quant)
    if as_json:
        click.echo(json.dumps(res))
    else:
        click.echo(prompt + res["text"])


@main.command(name="eval")
@click.option("--model", "recipe", default="tiny", show_default=True)
@click.option("--checkpoint", type=click.Path(), default=None)
@click.option("--text", "text_file", type=click.Path(), required=True)
@click.option("--windows", default=40, show_default=True, help="How many 512-token windows.")
@click.option("--scheme", type=click.Choice(sorted(KNOWN_SCHEMES)), default=None,
              help="Quantization scheme (default: the recipe's).")
@click.option("--quantizer", type=click.Choice(sorted(KNOWN_QUANTIZERS)), default=None,
              help="How int4 values are chosen (default: the recipe's).")
@click.option("--target", type=click.Choice(KNOWN_TARGETS), default=None,
              help="Quantize as this target's plan does (the weights its bundle ships, e.g. iOS's palettized "
                   "embedding); instead of --scheme.")
@click.option("--json", "as_json", is_flag=True)
@user_errors
def eval_cmd(recipe, checkpoint, text_file, windows, scheme, quantizer, target, as_json):
    """Perplexity of the fp model and of the quantized model on a text."""
    res = api.evaluate(recipe, Path(text_file), checkpoint, windows, Progress(quiet=as_json), scheme, quantizer,
                       target)
    if as_json:
        click.echo(json.dumps(res))
        return
    table = Table(title=f"perplexity on {res['text']} ({res['tokens']} tokens)")
    for col in ("recipe", "scheme", "quantizer", "ppl fp", "ppl quantized", "loss"):
        table.add_column(col)
    table.add_row(res["recipe"], res["scheme"], res["quantizer"], f"{res['ppl_fp']:.3f}", f"{res['ppl_int4']:.3f}",
                  f"{res['loss_pct']:+.2f}%")
    stdout.print(table)


@main.command()
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--serial", "serials", multiple=True, help="Handset serial (repeatable); default: the only one.")
@click.option("--all", "all_devices", is_flag=True, help="Every handset the adb server lists.")
@click.option("--prompt-len", default=512, show_default=True)
@click.option("--gen-len", default=128, show_default=True)
@click.option("--repeat", default=5, show_default=True)
@click.option("--warmup", default=1, show_default=True)
@click.option("--threads", type=int, default=None, help="Runner threads [runner default].")
@click.option("--backend", type=click.Choice(["cpu", "opencl"]), default="cpu", show_default=True)
@click.option("--cooldown-temp", type=float, default=None, help="Wait until battery <= C before each trial.")
@click.option("--timeout", "trial_timeout", default=900.0, show_default=True, help="Seconds per runner trial.")
@click.option("--adb-host", default=None, help="Remote adb server host (adb -H).")
@click.option("--adb-port", type=int, default=None, help="adb server port (adb -P).")
@click.option("--out", default="bench-out", show_default=True, type=click.Path(file_okay=False))
@click.option("--image", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Vision bundles: an image (any format Pillow reads; pushed as PPM). --prompt-len is then the "
                   "text after the image; reports vision encode time per image.")
@user_errors
def bench(bundle, serials, all_devices, prompt_len, gen_len, repeat, warmup, threads, backend, cooldown_temp,
          trial_timeout, adb_host, adb_port, out, image):
    """Benchmark a bundle's runner on adb handsets (concurrently); writes JSON, CSV and a PNG chart."""
    from device_tests.harness import BenchConfig, bench as run, failures

    cfg = BenchConfig(prompt_len=prompt_len, gen_len=gen_len, repeat=repeat, warmup=warmup, threads=threads,
                      backend=backend, cooldown_temp=cooldown_temp, trial_timeout_s=trial_timeout, image=image)
    show_settings("mcpm-export bench", bundle=bundle, serials=",".join(serials) or None, all=all_devices or None,
                  adb=f"{adb_host or 'localhost'}:{adb_port or 5037}", out=out, **vars(cfg))
    report, _ = run(Path(bundle), Path(out), list(serials) or None, all_devices, cfg, adb_host, adb_port, console)
    failed = failures(report)
    if failed:
        raise ExportError(f"{len(failed)} of {len(report['handsets'])} handset(s) failed: " + "; ".join(failed))


@main.command(name="run")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--prompt", required=True)
@click.option("--max-new-tokens", default=32, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print tokens, text, prefill_tok_s, decode_tok_s as JSON.")
@click.option("--image", type=click.Path(), default=None, help="An image for a vision bundle (v-int4, v2-int4).")
@click.option("--chat/--raw", default=True, show_default=True,
              help="--chat: the prompt is a user turn in the bundle's chat template; --raw: tokenized as is.")
@user_errors
def run_cmd(bundle, prompt, max_new_tokens, as_json, image, chat):
    """Greedy generation with an android/harmony bundle's host (x86_64) build."""
    from targets.tvm.runner import run_bundle

    if image is not None:
        from targets.tvm.runner import run_bundle_with_image
        res = run_bundle_with_image(Path(bundle), Path(image), prompt, max_new_tokens, chat=chat)
    else:
        res = run_bundle(Path(bundle), prompt, max_new_tokens, chat=chat)
    if as_json:
        click.echo(json.dumps(res))
    else:
        click.echo(prompt + res["text"])
        if image is not None:
            per = ", ".join(f"{t * 1000:.0f}" for t in res["vision_encode_s"])
            console.print(f"vision encode {res['vision_total_s']:.2f} s for {len(res['vision_encode_s'])} "
                          f"image(s) (ms each: {per}); {res['prompt_tokens']} prompt tokens")
        console.print(f"prefill {res['prefill_tok_s']:.1f} tok/s, decode {res['decode_tok_s']:.1f} tok/s "
                      f"({res['backend']})")


@main.command(name="runner")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Also copy the runner here (replaces DIR) [only build into the cache].")
@click.option("--force", is_flag=True, help="Rebuild even when a cached build exists.")
@user_errors
def runner_cmd(out, force):
    """Cross-compile the on-device runner mcpm-run (aarch64, cached, reproducible)."""
    from runner.build import build_runner, copy_runner, default_cache_dir

    show_settings("mcpm-export runner", cache=default_cache_dir(), out=out, force=force or None)
    built = build_runner(force=force)
    if out:
        copy_runner(built, Path(out))
    console.print(f"[bold green]runner ready:[/] {Path(out) if out else built}")


@main.command(name="image-plan")
@click.argument("image", type=click.Path())
@click.option("--model", "recipe", default="v2-int4", show_default=True, help="A vision recipe.")
@click.option("--json", "as_json", is_flag=True)
@user_errors
def image_plan(image, recipe, as_json):
    """How a vision recipe slices IMAGE: grid, slice sizes, number of image tokens."""
    from .recipes import get_recipe
    from .vision.slicing import plan_file

    res = plan_file(Path(image), get_recipe(recipe))
    if as_json:
        click.echo(json.dumps(res))
        return
    show_settings(f"image plan ({res['recipe']})", image=res["image"], size="x".join(map(str, res["size"])),
                  thumbnail="x".join(map(str, res["thumbnail"])),
                  grid=f"{res['grid'][0]} cols x {res['grid'][1]} rows" if res["grid"] else "none (not sliced)",
                  slice="x".join(map(str, res["slice"])) if res["slice"] else None,
                  encoded_images=res["num_images"], feature_tokens=res["image_feature_tokens"],
                  prompt_image_tokens=res["prompt_image_tokens"])


@main.command(name="release")
@click.option("--model", "recipes", required=True, help="Recipe name(s), comma separated.")
@click.option("--target", required=True, type=click.Choice([*KNOWN_TARGETS, "all"]),
              help="One target, or every target each recipe allows.")
@click.option("--checkpoint", type=click.Path(), default=None,
              help="Local checkpoint folder (one recipe only); default: embedded copy or HF cache.")
@click.option("--out", default="release", show_default=True, type=click.Path(file_okay=False))
@click.option("--force", is_flag=True, help="Replace older archives of the same recipe/target in --out.")
@click.option("--json", "as_json", is_flag=True, help="Print the archives (path, sha256, size) as JSON.")
@user_errors
def release_cmd(recipes, target, checkpoint, out, force, as_json, **flags):
    """Build, pack and verify reproducible release archives (mcpm-RECIPE-TARGET-SCHEME-vVERSION.tar.gz).
    Target options (--backend, --embedding, ...) apply to the targets that define them."""
    from .release import release

    names = recipes.split(",")
    if checkpoint is not None and len(names) != 1:
        raise ExportError(f"--checkpoint {checkpoint}: give exactly one --model with it (got {len(names)})")
    show_settings("mcpm-export release", models=recipes, target=target, checkpoint=checkpoint, out=out,
                  force=force or None, **flags)
    options = {t: target_options(t, flags) for t in KNOWN_TARGETS}
    results = release(names, target, Path(out), force, Progress(quiet=as_json), checkpoint=checkpoint,
                      options=options)
    if as_json:
        click.echo(json.dumps(results, indent=2))
        return
    table = Table(title="release archives")
    for col in ("archive", "size", "sha256"):
        table.add_column(col)
    for r in results:
        table.add_row(r["archive"], f"{r['size'] / 1e6:.1f} MB", r["sha256"])
    stdout.print(table)


@main.command(name="verify")
@click.argument("bundle", type=click.Path(exists=True))
@user_errors
def verify_cmd(bundle):
    """Check a bundle directory or release archive: file hashes, manifest schema, symbol prefix, versions."""
    from .verify import verify_bundle

    problems = verify_bundle(Path(bundle))
    for p in problems:
        console.print(f"[red]problem:[/] {escape(p)}", soft_wrap=True)
    if problems:
        raise ExportError(f"{bundle}: {len(problems)} problem(s); do not ship or run this bundle")
    console.print(f"[bold green]verified:[/] {bundle}")


@main.command(name="doctor")
@click.option("--json", "as_json", is_flag=True, help="Print the checks as JSON.")
def doctor_cmd(as_json):
    """Check the toolchain each target needs; exit status 0 only when every target can build."""
    from .doctor import BUILD_TARGETS, run_checks, summary

    res = summary(run_checks())
    if as_json:
        click.echo(json.dumps(res, indent=2))
    else:
        table = Table(title="mcpm-export doctor")
        for col in ("check", "needed by", "status", "detail", "fix"):
            table.add_column(col)
        for c in res["checks"]:
            table.add_row(c["name"], ",".join(c["needed_by"]), "[green]ok[/]" if c["ok"] else "[red]missing[/]",
                          c["detail"], "" if c["ok"] else c["fix"])
        stdout.print(table)
        for group, ok in res["targets"].items():
            verb = "build" if group in BUILD_TARGETS else "use"
            stdout.print(f"{group}: " + (f"[green]can {verb}[/]" if ok else f"[red]cannot {verb}[/]"))
        for fix in res["fixes"]:
            stdout.print(f"  fix: {fix}", soft_wrap=True, markup=False)
    sys.exit(0 if res["ok"] else 1)


# The export commands (android, harmony, ios) are generated here from KNOWN_TARGETS: do not add them
# by hand. Backends register in targets/__init__.py (TARGETS); their flags come from each target's
# Options dataclass (targets.base.option fields), every export command also gets the common ones below.
def option_flags(options_cls) -> list[click.Option]:
    """One click option per field of a targets.base.option dataclass: ``--field-name``, the field's
    default, help and choices; a bool is a flag; fields with ``cli=False`` are API only."""
    flags = []
    for f in dataclasses.fields(options_cls):
        meta = f.metadata
        if not meta.get("cli", True):
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):
            flags.append(click.Option([flag, f.name], is_flag=True, default=f.default, help=meta.get("help")))
            continue
        kind = click.Choice(list(meta["choices"])) if meta.get("choices") else None
        flags.append(click.Option([flag, f.name], type=kind, default=f.default, show_default=f.default is not None,
                                  help=meta.get("help")))
    return flags


def target_options(target: str, values: dict):
    """The target's Options instance from the flags' values (only its own fields)."""
    from targets import get_options

    cls = get_options(target)
    return cls(**{f.name: values[f.name] for f in dataclasses.fields(cls)
                  if f.metadata.get("cli", True) and f.name in values})


def make_export_command(target: str) -> click.Command:
    from targets import get_options

    @user_errors
    def run(recipe, checkpoint, out, force, allow_quality_loss, **flags):
        out = out or str(api.default_out(recipe, target))
        options = target_options(target, flags)
        rec, _ = api.check_export(target, recipe, options)     # the cheap checks; the checkpoint comes later
        show_settings(f"mcpm-export {target}", recipe=f"{rec.name} ({rec.repo_id}, {rec.quantization})",
                      checkpoint=checkpoint or "embedded copy or Hugging Face cache", out=out, force=force,
                      **flags)
        bundle = api.export(target, recipe, checkpoint, out, force, allow_quality_loss, Progress(), options)
        console.print(f"[bold green]bundle ready:[/] {bundle}")

    params = [
        click.Option(["--model", "recipe"], default="tiny", show_default=True, help="Recipe name."),
        click.Option(["--checkpoint"], type=click.Path(), default=None,
                     help="Checkpoint directory (default: embedded copy or Hugging Face cache)."),
        click.Option(["--out"], type=click.Path(), default=None, help="Bundle directory [dist/RECIPE-TARGET]."),
        click.Option(["--force"], is_flag=True, help="Replace a non-empty --out."),
        click.Option(["--allow-quality-loss"], is_flag=True, help="Export even if the quality gate fails."),
        *option_flags(get_options(target)),
    ]
    return click.Command(target, callback=run, params=params, help=f"Export a {target} bundle.")


def release_flags() -> list[click.Option]:
    """Every target's option flags, once each (targets sharing an Options class share its flags);
    two targets may not define the same flag differently."""
    from targets import get_options

    seen: dict[str, object] = {}
    flags = []
    for t in KNOWN_TARGETS:
        cls = get_options(t)
        for flag in option_flags(cls):
            owner = seen.setdefault(flag.name, cls)
            if owner is cls and flag.name not in {f.name for f in flags}:
                flags.append(flag)
            elif owner is not cls:
                raise RuntimeError(f"option {flag.name} is defined by two targets' Options")
    return flags


for _target in KNOWN_TARGETS:
    main.add_command(make_export_command(_target))
for _flag in release_flags():
    release_cmd.params.append(_flag)


if __name__ == "__main__":
    main()
