"""`mcpm-run --image`: the on-device image path (runner/vision.cc), real aarch64 build under qemu-aarch64.

Measured (tiny MiniCPM-V bundles, tests/support/tiny_minicpmv.py):
- resize: the runner's bicubic equals PIL's Image.resize(BICUBIC) bit for bit (max pixel difference 0)
  on every image of every plan below, upscale and downscale, noise and 0/255 checkerboards. Bound: 0.
- encoder inputs: patches and pos_interp bit-identical to exporter/vision/preprocess.py; the V2 sin-cos
  key positions within 2e-6 (float32 sin/cos of angles up to ~40 rad, numpy's SIMD vs glibc). Bound 1e-5.
- plan: equal to slicing.plan_image on every size of the table (incl. 4000x200, 200x4000, 1x1).
- end to end vs the host build (`mcpm-export run --image`, x86_64 libraries of the same bundle): image
  features within 1e-6 relative with fp32 vision weights (bound 1e-4); with q8 weights (the default,
  targets/tvm/vision_q8.py) 4e-3..7e-3 (bound targets/tvm/vision.PARITY_RTOL_Q8): ulp-level differences of
  the fp32 ops between aarch64 and x86_64 flip some int8 activation roundings. Text: the host generates from
  the runner's own features (q8) or its own (fp32): logits within 0.08-0.16 absolute (the int4 kernels'
  activation rounding, as in test_runner.py), bound verification.logit_atol (0.5); greedy tokens equal
  except at a near-tie, where the reference's best logit beats the runner's token by at most twice that
  bound (measured: step 7 of the multi-slice reply, top two 0.061 apart); from there the reference
  follows the runner's tokens.
Timings under qemu are emulated, not a phone's.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from exporter.vision import preprocess as pp
from exporter.vision.config import VisionConfig
from exporter.vision.slicing import ImageTokens, build_prompt, plan_image, slice_images
from runner import build
from test_runner import run, run_json   # the runner under qemu, one JSON line

QEMU = "qemu-aarch64-static"
pytestmark = pytest.mark.skipif(
    not (shutil.which(QEMU) and shutil.which("aarch64-linux-gnu-g++")),
    reason="needs qemu-aarch64-static and g++-aarch64-linux-gnu")

TOKENS = ImageTokens(8192, 8193, 8194, 8195, 0, [13])   # the tiny MiniCPM-V ids
BOS = 1
TINY = dict(width=64, depth=2, heads=4, mlp=240, patch=14, pos_grid=27, hidden=256)
PLAN_SIZES = [(4000, 200), (200, 4000), (448, 448), (1, 1), (2, 3), (1, 600), (600, 1), (1344, 896),
              (896, 448), (449, 449), (447, 449), (1000, 1000), (640, 480), (1920, 1080), (300, 1200),
              (5000, 100), (100, 5000), (897, 448), (1344, 1344), (2000, 1500)]
RESIZE_SIZES = [(1344, 896), (300, 1200), (1000, 700), (4000, 200), (200, 4000), (1, 1), (13, 7), (448, 448),
                (500, 333), (2000, 1500)]


@pytest.fixture(scope="module")
def runner_dir() -> Path:
    return build.build_runner()


def config_bundle(root: Path, version: int) -> tuple[Path, VisionConfig]:
    """A bundle holding only mlc-chat-config.json + vision/vision-config.json (+ V1 key_pos.bin): enough
    for --plan-only / --dump-images, which load no library."""
    from targets.tvm.vision import _vision_config_json
    vcfg = VisionConfig(version=version, slicing=version >= 2, **TINY)
    (root / "vision").mkdir(parents=True)
    key_pos = None
    if version == 1:
        g = vcfg.image_size // vcfg.patch
        np.random.default_rng(1).standard_normal((g * g, vcfg.hidden)).astype("<f4").tofile(root / "vision" / "key_pos.bin")
        key_pos = {"file": "key_pos.bin", "shape": [g * g, vcfg.hidden], "dtype": "float32"}
    conf = _vision_config_json(vcfg, TOKENS, {}, "mcpm_test_vision_", key_pos, BOS)
    (root / "vision" / "vision-config.json").write_text(json.dumps(conf))
    (root / "mlc-chat-config.json").write_text(json.dumps({"vocab_size": 8200, "bos_token_id": BOS}))
    return root, vcfg


@pytest.fixture(scope="module")
def v2_config(tmp_path_factory):
    return config_bundle(tmp_path_factory.mktemp("v2cfg"), 2)


@pytest.fixture(scope="module")
def v1_config(tmp_path_factory):
    return config_bundle(tmp_path_factory.mktemp("v1cfg"), 1)


def test_plan_matches_reference(runner_dir, v2_config, v1_config, tmp_path):
    rng = np.random.default_rng(0)
    sizes = PLAN_SIZES + [tuple(int(x) for x in rng.integers(1, 2200, 2)) for _ in range(12)]
    text = [305, 836, 585]
    for (bundle, vcfg) in (v2_config, v1_config):
        for w, h in sizes if vcfg.slicing else sizes[:6]:
            path = tmp_path / f"{w}x{h}.ppm"
            Image.new("RGB", (w, h), (10, 20, 30)).save(path)
            got = run_json(runner_dir, "--bundle", bundle, "--image", path, "--plan-only",
                           "--prompt-ids", ",".join(map(str, text)))
            plan = plan_image(w, h, vcfg)
            assert got["plan"] == plan.to_dict(), (w, h)
            assert got["image"] == {"width": w, "height": h}
            assert got["prompt_tokens"] == len(build_prompt(plan, TOKENS, text, BOS)[0]), (w, h)


def _checkerboard(w: int, h: int) -> Image.Image:
    y, x = np.mgrid[0:h, 0:w]
    return Image.fromarray(np.where((x + y) % 2, 255, 0).astype(np.uint8)[..., None].repeat(3, -1), "RGB")


def test_resize_and_encoder_inputs_match_pil_and_numpy(runner_dir, v2_config, v1_config, tmp_path):
    from targets.tvm.vision import synthetic_image
    cases = [(v2_config, synthetic_image(w, h, seed=w + h), f"noise{w}x{h}") for w, h in RESIZE_SIZES]
    cases += [(v2_config, _checkerboard(37, 23), "checker37x23"), (v2_config, _checkerboard(2500, 1700), "checker2500"),
              (v1_config, synthetic_image(640, 480), "v1-640x480")]
    key_pos_v1 = np.fromfile(v1_config[0] / "vision" / "key_pos.bin", dtype="<f4")
    for (bundle, vcfg), img, name in cases:
        src, dump = tmp_path / f"{name}.ppm", tmp_path / name
        img.save(src)
        dump.mkdir()
        run_json(runner_dir, "--bundle", bundle, "--image", src, "--plan-only", "--dump-images", dump)
        ref = slice_images(img, plan_image(img.width, img.height, vcfg))
        assert len(list(dump.glob("image-*.ppm"))) == len(ref), name
        for k, want in enumerate(ref):
            got = Image.open(dump / f"image-{k}.ppm")
            assert got.size == want.size, (name, k)
            diff = np.abs(np.asarray(got, dtype=int) - np.asarray(want, dtype=int)).max()
            assert diff == 0, f"{name} image {k}: max pixel difference {diff} vs PIL"
            inp = pp.encoder_inputs(want, vcfg, None if vcfg.adaptive else key_pos_v1)
            raw = np.fromfile(dump / f"image-{k}.inputs.bin", dtype="<f4")
            sizes = [inp[n].size for n in pp.INPUT_NAMES]
            patches, pos, key = np.split(raw, np.cumsum(sizes)[:-1])
            assert raw.size == sum(sizes)
            assert np.array_equal(patches, inp["patches"].ravel()), (name, k)
            assert np.array_equal(pos, inp["pos_interp"].ravel()), (name, k)
            assert np.abs(key - inp["key_pos"].ravel()).max() <= 1e-5, (name, k)


def _bad_images(d: Path) -> dict[str, tuple[Path, str]]:
    from io import BytesIO
    png, jpg = BytesIO(), BytesIO()
    Image.new("RGB", (20, 10)).save(png, "PNG")
    Image.new("RGB", (20, 10)).save(jpg, "JPEG")
    files = {"png": (png.getvalue(), "PNG data, not a binary PPM"),
             "jpeg": (jpg.getvalue(), "JPEG data, not a binary PPM"),
             "truncated": (b"P6\n100 100\n255\n" + bytes(15000), "truncated PPM: 100x100 needs 30000 bytes"),
             "ascii": (b"P3\n1 1\n255\n0 0 0\n", "not a binary PPM (no P6 header)"),
             "maxval": (b"P6\n1 1\n65535\n" + bytes(6), "PPM maxval 65535, only 255"),
             "empty": (b"", "not a binary PPM (no P6 header)"),
             "zero": (b"P6\n0 5\n255\n", "PPM size 0x5 out of range"),
             "header": (b"P6\n12 x\n255\n", "bad PPM header")}
    out = {}
    for name, (data, msg) in files.items():
        (d / name).write_bytes(data)
        out[name] = (d / name, msg)
    out["missing"] = (d / "nope.ppm", "cannot open")
    return out


def test_bad_image_one_error_line(runner_dir, v2_config, tmp_path):
    bundle, _ = v2_config
    for name, (path, msg) in _bad_images(tmp_path).items():
        for extra in (["--plan-only"], ["--prompt-len", "4"]):
            proc = run(runner_dir, "--bundle", bundle, "--image", path, *extra)
            lines = proc.stderr.strip().splitlines()
            assert proc.returncode == 1 and proc.stdout == "", (name, proc.stderr)
            assert len(lines) == 1 and lines[0].startswith(f"mcpm-run: error: --image {path}: "), (name, proc.stderr)
            assert msg in lines[0], (name, lines[0])
    text_only = tmp_path / "text"
    text_only.mkdir()
    (text_only / "mlc-chat-config.json").write_text('{"vocab_size": 100}')
    good = tmp_path / "ok.ppm"
    Image.new("RGB", (8, 8)).save(good)
    proc = run(runner_dir, "--bundle", text_only, "--image", good, "--prompt-len", "4")
    assert proc.returncode == 1 and "--image needs a vision bundle" in proc.stderr and len(proc.stderr.splitlines()) == 1
    proc = run(runner_dir, "--bundle", text_only, "--plan-only")
    assert proc.returncode == 1 and "need --image" in proc.stderr


# ---------------------------------------------------------------- real tiny MiniCPM-V bundles
def export_vision_bundle(root: Path, version: int, vision_weights: str | None = None) -> Path:
    from exporter import api
    from exporter.recipes import get_recipe
    from targets.tvm.options import TVMOptions
    from tests.support.tiny_minicpmv import tiny_recipe, write_tiny_minicpmv
    ckpt = write_tiny_minicpmv(root / "ckpt", version=version)
    mp = pytest.MonkeyPatch()
    mp.setattr(api, "get_recipe", lambda name: tiny_recipe(get_recipe(name)))   # tiny dims, same recipe
    try:
        return api.export("android", "v2-int4" if version == 2 else "v-int4", checkpoint=ckpt, out=root / "bundle",
                          options=TVMOptions(backend="cpu", vision_weights=vision_weights))
    finally:
        mp.undo()


@pytest.fixture(scope="module")
def v2_bundle(runner_dir, tmp_path_factory):
    return export_vision_bundle(tmp_path_factory.mktemp("v2"), 2)


def host_generate(bundle: Path, image: Image.Image, text_ids: list[int], n: int, feats_in=None,
                  prefix_ids: list[int] = ()) -> dict:
    """The host (x86_64) libraries of the same bundle, image path of targets/tvm/runner.py: features,
    prompt ids (tokens from vision-config.json, as the runner takes them; ``prefix_ids`` before the image),
    greedy tokens and logits (generated from ``feats_in`` when given, e.g. the runner's features, else
    from the host's)."""
    from targets.tvm.runner import load_bundle
    from targets.tvm.runner import VisionRunner, generate_with_image
    vision = VisionRunner.from_bundle(bundle)
    model, _, _ = load_bundle(bundle)
    plan, feats, _ = vision.embed_image(image)
    t = json.loads((bundle / "vision" / "vision-config.json").read_text())["tokens"]
    tokens = ImageTokens(t["im_start"], t["im_end"], t["slice_start"], t["slice_end"], t["unk"], t["newline"])
    ids, starts = build_prompt(plan, tokens, text_ids, t["bos"], prefix_ids)
    gen = generate_with_image(model, ids, starts, feats if feats_in is None else feats_in, vision.cfg.query_num, n)
    return {"plan": plan.to_dict(), "ids": ids, "feats": feats, **gen}


def reference_along(tokens: list[int], first: dict, margin: float, generate) -> list:
    """The reference's logits along ``tokens`` (the runner's greedy reply), starting from ``first`` (its own
    greedy generation): each runner token must be the reference's argmax, except at a near-tie where the
    reference's best logit beats the runner's token by at most ``margin``; from such a step on the
    reference continues from the runner's tokens (``generate(forced_tokens, n)`` -> {"tokens", "logits"})."""
    logits, done, ref = [], 0, first
    while done < len(tokens):
        rest = tokens[done:]
        k = next((i for i, (a, b) in enumerate(zip(rest, ref["tokens"])) if a != b), len(rest))
        assert k < len(rest) or len(ref["tokens"]) >= len(rest), (done, rest, ref["tokens"])
        logits += list(ref["logits"][:min(k + 1, len(rest))])
        if k < len(rest):
            row = np.asarray(ref["logits"][k]).ravel()
            gap = float(row.max() - row[rest[k]])
            assert gap <= margin, f"step {done + k}: runner {rest[k]} vs reference {ref['tokens'][k]}, gap {gap:.3f}"
        done += k + 1
        if done < len(tokens):
            ref = generate(tokens[:done], len(tokens) - done)
    return logits


def check_against_host(runner_dir: Path, bundle: Path, img: Image.Image, tmp_path: Path, prompt: str, n: int = 8):
    from click.testing import CliRunner

    from device_tests.harness import image_to_ppm
    from exporter.chat import get_chat_template
    from exporter.cli import main
    from exporter.tokenizer import Tokenizer
    png, ppm = tmp_path / "image.png", tmp_path / "image.ppm"
    img.save(png)
    assert image_to_ppm(png, ppm) == img.size
    # the runner tokenizes the prompt itself, as a minicpm-v user turn opened by the image (chat, the default
    # of both the runner and `mcpm-export run`): [bos] <用户> image-block \n text <AI>
    tok = Tokenizer(bundle / "tokenizer.model")
    before, after = get_chat_template("minicpm-v").image_turn(prompt)
    prefix, text = tok.encode(before, bos=False), tok.encode(after, bos=False)
    out = run_json(runner_dir, "--bundle", bundle, "--image", ppm, "--prompt", prompt,
                   "--gen-len", n, "--threads", 2, "--features-out", tmp_path / "f.bin", "--logits-out", tmp_path / "l.bin")
    from targets.tvm.vision import PARITY_RTOL_Q8
    vconf = json.loads((bundle / "vision" / "vision-config.json").read_text())
    q8 = vconf["weights"]["format"] == "q8"
    feats = np.fromfile(tmp_path / "f.bin", dtype="<f4").reshape(-1, vconf["config"]["hidden"])
    # q8: generate from the runner's features, so the text path is compared exactly and the features apart
    ref = host_generate(bundle, img, text, n, feats if q8 else None, prefix)
    atol = json.loads((bundle / "manifest.json").read_text())["verification"]["logit_atol"]
    ref_logits = reference_along(out["tokens"], ref, 2 * atol,
                                 lambda forced, k: host_generate(bundle, img, text + forced, k, feats if q8 else None, prefix))
    cli = CliRunner().invoke(main, ["run", str(bundle), "--image", str(png), "--prompt", prompt,
                                    "--max-new-tokens", str(n), "--json"])
    assert cli.exit_code == 0, cli.output
    host = json.loads(cli.output.splitlines()[-1])     # stops at EOS; the runner does not
    raw = CliRunner().invoke(main, ["run", str(bundle), "--image", str(png), "--prompt", prompt, "--raw",
                                    "--max-new-tokens", "1", "--json"])   # --raw: [bos] image-block \n text
    assert raw.exit_code == 0, raw.output
    raw_len = len(ref["ids"]) - len(prefix) - len(text) + len(tok.encode(prompt, bos=False))
    assert json.loads(raw.output.splitlines()[-1])["prompt_tokens"] == raw_len
    if not q8:   # q8: the host CLI encodes its own features (not bit-equal to the runner's)
        assert out["tokens"][:len(host["tokens"])] == host["tokens"] == ref["tokens"][:len(host["tokens"])]
        assert out["text"] == host["text"]
    assert out["plan"] == host["plan"] == ref["plan"]
    assert out["prompt_tokens"] == out["prompt_len"] == host["prompt_tokens"] == len(ref["ids"])
    assert out["image"] == {"width": img.width, "height": img.height}
    bound = PARITY_RTOL_Q8 if q8 else 1e-4
    assert np.abs(feats - ref["feats"]).max() / np.abs(ref["feats"]).max() <= bound
    logits = np.fromfile(tmp_path / "l.bin", dtype="<f4").reshape(n, -1)
    err = max(float(np.abs(a - np.asarray(b).ravel()).max()) for a, b in zip(logits, ref_logits, strict=True))
    assert err <= atol, f"runner vs host logits differ by {err:.3f} (bound {atol})"
    n_img = ref["plan"]["num_images"]
    assert len(out["vision_encode_ms"]) == n_img and all(t > 0 for t in out["vision_encode_ms"])
    assert out["vision_encode_total_ms"] == pytest.approx(sum(out["vision_encode_ms"]), abs=0.01)
    for key in ("ttft_ms", "prefill_tok_s", "decode_tok_s", "load_ms", "image_prep_ms", "vision_load_ms"):
        assert out[key] > 0, key
    return out


@pytest.mark.slow   # exporting the tiny bundle alone takes 25-50 s here, the multi-slice run ~45 s under qemu
@pytest.mark.parametrize("size", [(400, 300), (1344, 896)], ids=["thumbnail-only", "multi-slice"])
def test_v2_tokens_equal_host_run(runner_dir, v2_bundle, tmp_path, size):
    from targets.tvm.vision import synthetic_image
    out = check_against_host(runner_dir, v2_bundle, synthetic_image(*size), tmp_path, "Describe the picture:")
    assert out["plan"]["num_images"] == (1 if size == (400, 300) else 7)


@pytest.mark.slow
def test_v1_tokens_equal_host_run(runner_dir, tmp_path_factory, tmp_path):
    from targets.tvm.vision import synthetic_image
    bundle = export_vision_bundle(tmp_path_factory.mktemp("v1"), 1, "fp32")    # V2 bundles: q8 (default)
    out = check_against_host(runner_dir, bundle, synthetic_image(640, 480, seed=3), tmp_path, "Describe the picture:")
    assert out["plan"]["thumbnail"] == [448, 448] and out["plan"]["grid"] is None


@pytest.mark.slow
def test_bench_harness_with_image(runner_dir, v2_bundle, adb_server, fake_handset, tmp_path):
    """`mcpm-export bench --image`: PNG converted to PPM on the host, pushed (sha256-checked), vision timings."""
    from rich.console import Console

    from device_tests.harness import REMOTE_IMAGE, BenchConfig, bench, failures
    from targets.tvm.vision import synthetic_image
    png = tmp_path / "pic.png"
    synthetic_image(400, 300, seed=7).save(png)
    _, serial = fake_handset()
    cfg = BenchConfig(prompt_len=6, gen_len=4, repeat=1, warmup=0, threads=2, image=str(png), trial_timeout_s=600)
    console = Console(record=True, width=200)
    report, paths = bench(v2_bundle, tmp_path / "out", serials=[serial], cfg=cfg, adb_port=adb_server.port,
                          console=console)
    assert failures(report) == []
    h = report["handsets"][0]
    assert REMOTE_IMAGE in h["pushed_files"] and report["image"]["width"] == 400
    trial = h["trials"][0]
    assert len(trial["vision_encode_ms"]) == 1 and h["summary"]["vision_encode_total_ms"]["n"] == 1
    vocab = json.loads((v2_bundle / "mlc-chat-config.json").read_text())["vocab_size"]
    text = [3 + (i * 37) % (vocab - 3) for i in range(1, 7)]     # the runner's --prompt-len 6 text
    assert h["tokens"] == host_generate(v2_bundle, Image.open(png).convert("RGB"), text, 4)["tokens"]
    assert "vision 1 img (emulated)" in console.export_text()
    assert "vision_images" in paths["csv"].read_text().splitlines()[0]
