"""`mcpm-export bench`: run a bundle's on-device runner on one or more adb handsets, concurrently.

Per handset: device facts, ABI check, push only the files whose sha256 differs (verified after the
push), optional cool-down, warm-up + repeated trials with thermals before/after each, pull each
trial's JSON. With an image (vision bundles) the image is converted to binary PPM on the host (the runner
reads nothing else), pushed and sha256-checked like the bundle's files, and each trial reports the vision
encode time per encoded image. A failure on one handset (offline, unauthorized, storage full, runner crash or hang,
wrong ABI) becomes that handset's error; the other handsets' results are kept and written.
"""
from __future__ import annotations

import json
import re
import shlex
import statistics
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from device_tests.adb import Adb, HandsetError
from device_tests.facts import bundle_abi, parse_facts, parse_thermals, FACTS_COMMAND, THERMAL_COMMAND
from exporter.bundle import check_files, sha256_file
from exporter.errors import ExportError

REMOTE_BASE = "/data/local/tmp/mcpm"
RUNNER = "runner/mcpm-run"
RESULTS_DIR = "results"  # on the device, inside the bundle dir; never compared or pushed
EXIT_SENTINEL = "@@mcpm-run-exit="
REMOTE_IMAGE = "inputs/image.ppm"  # on the device, inside the bundle dir


@dataclass
class BenchConfig:
    prompt_len: int = 512
    gen_len: int = 128
    repeat: int = 5
    warmup: int = 1
    threads: int | None = None
    backend: str = "cpu"  # runner --device
    cooldown_temp: float | None = None  # wait until battery temperature <= this (deg C) before each trial
    cooldown_timeout_s: float = 900.0
    trial_timeout_s: float = 900.0
    push_timeout_s: float = 1800.0
    image: str | None = None  # vision bundles: any image Pillow opens; prompt_len is then the text after it


@dataclass
class HandsetResult:
    serial: str
    facts: dict = field(default_factory=dict)
    trials: list[dict] = field(default_factory=list)
    pushed: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def emulated(self) -> bool:
        return bool(self.facts.get("emulated"))


def runner_command(remote_dir: str, cfg: BenchConfig, run_name: str) -> str:
    """The one place the on-device runner is invoked (flags as in runner/mcpm_run.cc)."""
    args = f"./{RUNNER} --bundle . --prompt-len {cfg.prompt_len} --gen-len {cfg.gen_len}"
    if cfg.threads:
        args += f" --threads {cfg.threads}"
    if cfg.backend != "cpu":
        args += f" --device {shlex.quote(cfg.backend)}"
    if cfg.image:
        args += f" --image {REMOTE_IMAGE}"
    out = f"{RESULTS_DIR}/{run_name}"
    # the sentinel proves the command ran to its end: a dropped connection can look like exit status 0
    return (f"cd {shlex.quote(remote_dir)} && mkdir -p {RESULTS_DIR} && {{ {args} > {out}.json 2> {out}.err; "
            f"echo \"{EXIT_SENTINEL}$?\"; }}")


def runner_synthetic_prompt(vocab_size: int, n: int, bos_token_id: int = 1) -> list[int]:
    """The prompt `mcpm-run --prompt-len n` feeds (runner/mcpm_run.cc): BOS, then 3 + (i*37) % (vocab-3)."""
    return [bos_token_id] + [3 + (i * 37) % (vocab_size - 3) for i in range(1, n)]


def image_to_ppm(src: Path, dst: Path) -> tuple[int, int]:
    """Any image Pillow can open -> binary PPM (P6, 8-bit RGB), the runner's only image format; (w, h).

    RGB conversion as the host path does it (slicing.slice_images: Image.convert("RGB"), no EXIF
    rotation), so host and runner see the same pixels."""
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(src) as im:
            rgb = im.convert("RGB")
    except (OSError, UnidentifiedImageError) as e:
        raise ExportError(f"--image {src}: cannot read image ({e.__class__.__name__}: {e})") from None
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    rgb.save(dst, format="PPM")
    return rgb.size


def inspect_bundle(bundle: Path) -> dict:
    """Manifest + local sha256 of every file + the ABI the runner binary was built for."""
    bundle = Path(bundle)
    manifest_path = bundle / "manifest.json"
    if not manifest_path.is_file():
        raise ExportError(f"not a finished mcpm-export bundle: {manifest_path} is missing")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as e:
        raise ExportError(f"{manifest_path}: invalid JSON ({e})") from None
    problems = check_files(bundle, manifest)   # a tampered or truncated bundle is never pushed
    if problems:
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ExportError(f"bundle does not verify against its manifest: {problems[0]}{more}")
    runner = bundle / RUNNER
    if not runner.is_file():
        raise ExportError(f"bundle {bundle} has no {RUNNER}: build the runner (runner/) into the bundle first")
    host_lib = ((manifest.get("libs") or {}).get("host") or {}).get("so")  # x86_64 build: never on a phone
    skip = (RESULTS_DIR + "/",) + ((host_lib.rpartition("/")[0] + "/",) if host_lib and "/" in host_lib else ())
    files = {}
    for p in sorted(bundle.rglob("*")):
        rel = p.relative_to(bundle).as_posix()
        if p.is_file() and not rel.startswith(skip):
            files[rel] = sha256_file(p)
    return {"path": bundle, "name": bundle.name, "manifest": manifest, "files": files, "abi": bundle_abi(runner),
            "local": {}}


def add_image(info: dict, image: Path, out_dir: Path) -> dict:
    """Convert the bench image to PPM under out_dir and push it with the bundle as REMOTE_IMAGE."""
    if not (info["path"] / "vision" / "vision-config.json").is_file():
        raise ExportError(f"--image: bundle {info['name']} has no vision part (vision/vision-config.json); "
                          "images need a v-int4 / v2-int4 bundle")
    ppm = Path(out_dir) / Path(REMOTE_IMAGE).name   # adb push keeps the local name
    w, h = image_to_ppm(Path(image), ppm)
    info["files"][REMOTE_IMAGE] = sha256_file(ppm)
    info["local"][REMOTE_IMAGE] = ppm
    return {"path": str(image), "width": w, "height": h}


def select_serials(adb: Adb, serials: list[str] | None, all_devices: bool) -> list[str]:
    attached = adb.devices()
    if serials:
        return list(dict.fromkeys(serials))
    if all_devices:
        if not attached:
            raise ExportError(f"no handsets attached to {adb.where} (`adb devices` lists none)")
        return sorted(attached)
    if len(attached) == 1:
        return list(attached)
    if not attached:
        raise ExportError(f"no handsets attached to {adb.where} (`adb devices` lists none)")
    raise ExportError(f"{len(attached)} handsets attached to {adb.where}: pass --serial S (repeatable) or --all")


def run_bench(bundle: Path, adb: Adb, out_dir: Path, serials: list[str] | None = None, all_devices: bool = False,
              cfg: BenchConfig | None = None, console: Console | None = None) -> dict:
    """Benchmark `bundle` on the selected handsets concurrently; returns the report dict.

    Each run's raw runner JSON is pulled to out_dir/raw/<serial>/{warmup,trial}-<n>.json."""
    cfg = cfg or BenchConfig()
    if cfg.repeat < 1 or cfg.warmup < 0 or cfg.prompt_len < 1 or cfg.gen_len < 1:
        raise ExportError("bench: --repeat and --prompt-len/--gen-len must be >= 1, --warmup >= 0")
    info = inspect_bundle(bundle)
    try:
        (Path(out_dir) / "raw").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ExportError(f"--out {out_dir}: cannot create it ({e.strerror})") from None
    image = add_image(info, Path(cfg.image), Path(out_dir)) if cfg.image else None
    targets = select_serials(adb, serials, all_devices)
    console = console or Console(stderr=True)
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=console, transient=False) as progress:
        tasks = {s: progress.add_task(f"{s}: waiting", total=None) for s in targets}

        def one(serial: str) -> HandsetResult:
            def say(msg: str) -> None:
                progress.update(tasks[serial], description=f"{serial}: {msg}")
            result = HandsetResult(serial)
            try:
                _bench_handset(adb, serial, info, cfg, result, say, Path(out_dir) / "raw")
                say(f"[green]done[/] ({len(result.trials)} trials)")
            except HandsetError as e:
                result.error = _explain(adb, serial, str(e))
                say(f"[red]failed[/]: {result.error}")
            except ExportError as e:
                result.error = str(e)
                say(f"[red]failed[/]: {result.error}")
            except Exception as e:  # a bug must not cost the other handsets their results
                result.error = f"internal error: {type(e).__name__}: {e}"
                say(f"[red]failed[/]: {result.error}")
            return result

        with ThreadPoolExecutor(max_workers=max(1, len(targets))) as pool:
            results = list(pool.map(one, targets))
    return {"bundle": {"name": info["name"], "path": str(info["path"]), "abi": info["abi"],
                       "recipe": info["manifest"].get("recipe"), "target": info["manifest"].get("target"),
                       "quantization": info["manifest"].get("quantization")},
            "config": {k: getattr(cfg, k) for k in ("prompt_len", "gen_len", "repeat", "warmup", "threads",
                                                   "backend", "cooldown_temp")}, "image": image,
            "adb": adb.where, "handsets": [_result_dict(r) for r in results]}


def _explain(adb: Adb, serial: str, message: str) -> str:
    """Name the real cause when the handset itself is gone or locked."""
    state = adb.state(serial)
    if state == "device":
        return message
    if state == "unauthorized":
        return f"handset is unauthorized: accept the 'Allow USB debugging' prompt on it ({message})"
    return f"handset is {'not attached' if state == 'missing' else state} ({message})"


def _bench_handset(adb: Adb, serial: str, info: dict, cfg: BenchConfig, result: HandsetResult, say,
                   raw_dir: Path) -> None:
    state = adb.state(serial)
    if state != "device":
        raise HandsetError(f"adb state is '{state}'")
    say("reading device facts")
    result.facts = parse_facts(adb.check_shell(serial, FACTS_COMMAND, "reading device facts", 60))
    abis = result.facts.get("abilist") or [result.facts.get("abi")]
    if info["abi"] not in abis:
        raise ExportError(f"bundle {info['name']} is built for {info['abi']} but the handset's ABI is "
                          f"{result.facts.get('abi')} (supports {','.join(a for a in abis if a)})")
    remote = f"{REMOTE_BASE}/{info['name']}"
    result.pushed = _sync_bundle(adb, serial, info, remote, cfg, say)
    total = cfg.warmup + cfg.repeat
    for i in range(total):
        warm = i < cfg.warmup
        n = i + 1 if warm else i - cfg.warmup + 1
        label = f"warm-up {n}/{cfg.warmup}" if warm else f"trial {n}/{cfg.repeat}"
        run_name = f"warmup-{n}" if warm else f"trial-{n}"
        if cfg.cooldown_temp is not None:
            _cool_down(adb, serial, cfg, say, label)
        before = parse_thermals(adb.check_shell(serial, THERMAL_COMMAND, "reading thermals", 60))
        say(f"{label}: running mcpm-run")
        record = _run_trial(adb, serial, remote, cfg, run_name, label, result, raw_dir)
        after = parse_thermals(adb.check_shell(serial, THERMAL_COMMAND, "reading thermals", 60))
        if not warm:
            record.update(trial=n, thermal_before=before, thermal_after=after,
                          emulated=result.emulated)
            result.trials.append(record)


def _sync_bundle(adb: Adb, serial: str, info: dict, remote: str, cfg: BenchConfig, say) -> list[str]:
    """Push the files whose sha256 differs on the device, delete stale ones, verify after pushing."""
    say("comparing sha256 with the handset")
    on_device = _remote_hashes(adb, serial, remote)
    stale = [rel for rel in on_device if rel not in info["files"] and not rel.startswith(RESULTS_DIR + "/")]
    if stale:
        adb.check_shell(serial, f"cd {shlex.quote(remote)} && rm -f " + " ".join(shlex.quote(s) for s in stale),
                        "removing stale files")
    todo = [rel for rel, digest in info["files"].items() if on_device.get(rel) != digest]
    by_dir: dict[str, list[str]] = {}
    for rel in todo:
        by_dir.setdefault(rel.rpartition("/")[0], []).append(rel)
    if by_dir:  # `adb push a b dir/` needs dir/ to exist
        dirs = " ".join(shlex.quote(f"{remote}/{d}") for d in sorted(by_dir) if d)
        adb.check_shell(serial, f"mkdir -p {shlex.quote(remote)} {dirs}", "creating bundle directories")
    for n, (d, rels) in enumerate(sorted(by_dir.items()), 1):
        say(f"pushing {len(todo)} changed file(s) ({n}/{len(by_dir)} dirs)")
        local = [str(info["local"].get(r) or info["path"] / r) for r in rels]   # local: the bench image
        adb.push(serial, local, f"{remote}/{d}/" if d else f"{remote}/", cfg.push_timeout_s)
    if todo:
        say("verifying pushed files")
        after = _remote_hashes(adb, serial, remote)
        bad = [rel for rel in todo if after.get(rel) != info["files"][rel]]
        if bad:
            raise HandsetError(f"sha256 mismatch on the handset after push: {', '.join(bad[:3])}")
    adb.check_shell(serial, f"chmod 755 {shlex.quote(remote + '/' + RUNNER)}", "chmod runner")
    return todo


def _remote_hashes(adb: Adb, serial: str, remote: str) -> dict[str, str]:
    q = shlex.quote(remote)
    out = adb.check_shell(serial, f"mkdir -p {q} && cd {q} && find . -type f -exec sha256sum {{}} +",
                          "listing sha256 on the handset", 300)
    hashes = {}
    for line in out.splitlines():
        m = re.match(r"^([0-9a-f]{64})\s+\*?\./(.+)$", line.strip())
        if m:
            hashes[m.group(2)] = m.group(1)
    return hashes


def _cool_down(adb: Adb, serial: str, cfg: BenchConfig, say, label: str) -> None:
    deadline = time.monotonic() + cfg.cooldown_timeout_s
    while True:
        t = parse_thermals(adb.check_shell(serial, THERMAL_COMMAND, "reading thermals", 60)).get("battery_c")
        if t is None:
            raise HandsetError("--cooldown-temp given but the handset reports no battery temperature")
        if t <= cfg.cooldown_temp:
            return
        if time.monotonic() > deadline:
            raise HandsetError(f"did not cool to {cfg.cooldown_temp} C within {cfg.cooldown_timeout_s:.0f} s "
                               f"(battery at {t} C)")
        say(f"{label}: cooling down, battery {t:.1f} C > {cfg.cooldown_temp} C")
        time.sleep(2.0)


def _run_trial(adb: Adb, serial: str, remote: str, cfg: BenchConfig, run_name: str, label: str,
               result: HandsetResult, raw_dir: Path) -> dict:
    try:
        rc, out, err = adb.shell(serial, runner_command(remote, cfg, run_name), cfg.trial_timeout_s)
    except subprocess.TimeoutExpired:
        try:  # best effort: stop the hung runner on the handset
            adb.shell(serial, f"pkill -f {shlex.quote(remote + '/runner/')}", 20)
        except (subprocess.TimeoutExpired, OSError):
            pass
        raise HandsetError(f"{label}: mcpm-run did not finish within {cfg.trial_timeout_s:.0f} s (hung?)") from None
    m = re.search(re.escape(EXIT_SENTINEL) + r"(\d+)", out)
    if m is None:
        raise HandsetError(f"{label}: connection lost while mcpm-run was running "
                           f"(adb exit {rc}: {(err or out).strip()[-200:] or 'no output'})")
    rc = int(m.group(1))
    if rc != 0:
        tail = ""
        try:
            _, tail, _ = adb.shell(serial, f"tail -n 3 {shlex.quote(remote)}/{RESULTS_DIR}/{run_name}.err", 30)
        except subprocess.TimeoutExpired:
            pass
        what = f"crashed with signal {rc - 128}" if rc > 128 else f"exited with status {rc}"
        lines = [ln.strip() for ln in (tail.strip() or err or out).splitlines() if ln.strip()]
        last = " / ".join(lines[-2:]) or "no output"
        raise HandsetError(f"{label}: mcpm-run {what}: {last}")
    local_dir = raw_dir / re.sub(r"[^\w.-]", "_", result.serial)
    local_dir.mkdir(parents=True, exist_ok=True)
    local = local_dir / f"{run_name}.json"
    adb.pull(serial, f"{remote}/{RESULTS_DIR}/{run_name}.json", str(local))
    try:
        record = json.loads(local.read_text())
    except json.JSONDecodeError:
        raise HandsetError(f"{label}: mcpm-run printed no JSON object (see {local})") from None
    missing = [k for k in ("prefill_tok_s", "decode_tok_s", "ttft_ms") + (("vision_encode_ms",) if cfg.image else ())
               if k not in record]
    if missing:
        raise HandsetError(f"{label}: mcpm-run JSON lacks {', '.join(missing)} (see {local})")
    return record


def _stats(values: list[float]) -> dict:
    if not values:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def _result_dict(r: HandsetResult) -> dict:
    trials = r.trials
    summary = {"pp_tok_s": _stats([t["prefill_tok_s"] for t in trials]),
               "tg_tok_s": _stats([t["decode_tok_s"] for t in trials]),
               "ttft_ms": _stats([t["ttft_ms"] for t in trials]),
               "load_ms": _stats([t["load_ms"] for t in trials if "load_ms" in t]),
               "peak_rss_kb": max((t.get("peak_rss_kb") or 0 for t in trials), default=None),
               "threads": trials[0].get("threads") if trials else None}
    if any("vision_encode_ms" in t for t in trials):  # per encoded image (thumbnail, then slices), ms
        per = [t["vision_encode_ms"] for t in trials]
        summary.update(vision_encode_total_ms=_stats([t["vision_encode_total_ms"] for t in trials]),
                       vision_encode_ms=[_stats([p[i] for p in per if i < len(p)]) for i in range(max(map(len, per)))],
                       prompt_tokens=trials[0].get("prompt_tokens"), plan=trials[0].get("plan"))
    token_runs = {json.dumps(t.get("tokens")) for t in trials}
    return {"serial": r.serial, "status": "ok" if r.ok else "failed", "error": r.error,
            "emulated": r.emulated, "facts": r.facts, "pushed_files": r.pushed, "summary": summary,
            "tokens": trials[0].get("tokens") if trials else None,
            "tokens_identical_across_trials": len(token_runs) <= 1, "trials": trials}


def bench(bundle: Path, out_dir: Path, serials: list[str] | None = None, all_devices: bool = False,
          cfg: BenchConfig | None = None, adb_host: str | None = None, adb_port: int | None = None,
          console: Console | None = None) -> tuple[dict, dict[str, Path]]:
    """What `mcpm-export bench` calls: run, print a table per handset, write JSON/CSV/PNG."""
    from device_tests.report import print_tables, write_reports

    console = console or Console()
    report = run_bench(Path(bundle), Adb(adb_host, adb_port), Path(out_dir), serials, all_devices, cfg, console)
    print_tables(report, console)
    paths = write_reports(report, Path(out_dir))
    console.print(f"reports: {paths['json']}  {paths['csv']}  {paths['png']}")
    return report, paths


def failures(report: dict) -> list[str]:
    """One line per failed handset, for the exit status."""
    return [f"{h['serial']}: {h['error']}" for h in report["handsets"] if h["status"] != "ok"]
