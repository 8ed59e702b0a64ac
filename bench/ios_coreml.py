"""iOS / Core ML package figures: size and quality on a recipe (default tiny), size at MiniCPM-2B width.

    python3 bench/ios_coreml.py [--model tiny] [--eval-text FILE] [--windows 12]
    python3 bench/ios_coreml.py --width-2b 1 2 [--embeddings lut6 int8]
    python3 bench/ios_coreml.py --mem 1 2 [--embeddings lut6] [--json]

Default mode: builds the package the `ios` target builds (the iOS plan's central quantization, shipped as
int4 per-block 32 codes) with each embedding/head representation (lut6 = 6-bit palettized, int8, int4;
the plan's quantization for each) and reports weight.bin
bytes per parameter, perplexity of the weights the package holds (calibration gate windows and an
evaluation text) and the build times. Linux cannot run Core ML, so there are no speed figures:
perplexities use the package's decompressed weights in the PyTorch model.

--width-2b N...: real conversions of random-weight models with MiniCPM-2B's widths (hidden 2304,
inter 5760, vocab 122753, tied; bench/make_2b_checkpoint.py) and N layers, weight.bin bytes only, then
the straight line through the measurements extrapolated to 40 layers. Results: bench/RESULTS.md, iOS.

--mem N...: peak RSS per stage of the same 2B-width conversion (random model build, CoreMLMiniCPM
wrapper, per function torch.export / ct.convert / compression / save, the multifunction merge,
verification with the NumPy MIL interpreter), each layer count in its own process; VmRSS is sampled
every 20 ms by a thread and the maximum attributed to the stage running at that moment. Then the
fit peak = fixed + slope x layers and its value at 40 layers.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.make_2b_checkpoint import CONFIG_2B  # noqa: E402
from exporter import api  # noqa: E402
from exporter.config import MiniCPMConfig  # noqa: E402
from exporter.model import MiniCPM  # noqa: E402
from exporter.quality import CALIBRATION_TEXT, perplexity  # noqa: E402
from exporter.quant import quantize_state_dict  # noqa: E402
from targets.coreml.convert import weight_file  # noqa: E402
from targets.coreml.mil_interp import Interpreter  # noqa: E402
from targets.coreml.options import IOSOptions  # noqa: E402
from targets.coreml.target import IOS, convert_weights  # noqa: E402
from targets.coreml.verify import package_state_dict  # noqa: E402


def plan_quantization(recipe, embedding: str):
    return IOS.plan(recipe, IOSOptions(embedding=embedding)).quantization


def random_weights(model: MiniCPM, embedding: str) -> dict:
    """Shipped tensors of a random-weight model without calibration (round to nearest on the plan's
    scheme, the plan's codecs): the sizes and memory are those of the real export."""
    from exporter.recipes import get_recipe
    q = plan_quantization(get_recipe("sft-int4"), embedding)
    state = model.state_dict()
    qm = quantize_state_dict(state, q.scheme, search=False)
    for name, codec in q.codecs:
        qm.tensors[name] = codec.encode(state[name])
    return qm.tensors


def build(tensors: dict, cfg, context: int, chunk: int, embedding: str, pkg: Path, progress=lambda s, m: None) -> float:
    t = time.perf_counter()
    convert_weights(tensors, cfg, context, chunk, pkg, embedding, progress=progress)
    return time.perf_counter() - t


def quality(args) -> None:
    lm = api.load(args.model)
    rec, cfg = lm.recipe, lm.config
    params = sum(p.numel() for p in lm.model.parameters())
    calib = lm.tokenizer.encode(CALIBRATION_TEXT.read_text())
    gate = calib[512 * rec.calibration_windows:]
    evalt = lm.tokenizer.encode(Path(args.eval_text).read_text())

    def ppl(model):
        return (perplexity(model, gate, count=rec.gate_windows),
                perplexity(model, evalt, count=args.windows))

    fp = ppl(lm.model)
    rows = [("fp32 reference", "-", "-", fp)]
    t_quant = {}
    for embedding in args.embeddings:
        q = plan_quantization(rec, embedding)
        t = time.perf_counter()
        qm, _, _ = api.quantize(lm, q.scheme, quantizer=q.quantizer, codecs=dict(q.codecs), allow_quality_loss=True)
        t_quant[embedding] = round(time.perf_counter() - t, 1)
        label = f"{q.scheme.name} ({q.quantizer})"
        with tempfile.TemporaryDirectory() as tmp:
            pkg = Path(tmp) / "m.mlpackage"
            t_build = build(qm.tensors, cfg, rec.context_window, rec.prefill_chunk, embedding, pkg)
            size = weight_file(pkg).stat().st_size
            held = MiniCPM.from_state_dict(cfg, package_state_dict(Interpreter.from_package(pkg),
                                                                   list(lm.state)))
            rows.append((f"{label}, embedding {embedding}", f"{size / 1e6:.2f} MB",
                         f"{size / params:.3f}", ppl(held)))
            print(f"built {label} {embedding} in {t_build:.0f} s", file=sys.stderr)
    print(f"{args.model}: {params / 1e6:.2f}M parameters; quantization (s) {t_quant}; "
          f"perplexity on calibration gate windows ({rec.gate_windows} x 512) / "
          f"{Path(args.eval_text).name} ({args.windows} x 512)\n")
    print("| weights | weight.bin | bytes/param | ppl gate | ppl eval |")
    print("|---|---|---|---|---|")
    for name, size, bpp, (g, e) in rows:
        dg, de = 100 * (g / fp[0] - 1), 100 * (e / fp[1] - 1)
        print(f"| {name} | {size} | {bpp} | {g:.3f} ({dg:+.2f}%) | {e:.3f} ({de:+.2f}%) |")


def model_2b(layers: int, distinct_norms: bool = False) -> MiniCPM:
    """MiniCPM-2B widths with ``layers`` layers, random weights (N(0, 0.02) matrices).
    distinct_norms: random norm weights too (identical ones are deduplicated into one constant)."""
    cfg = MiniCPMConfig.from_hf({**CONFIG_2B, "num_hidden_layers": layers})
    with torch.no_grad():
        model = MiniCPM(cfg).eval()
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.02)
            elif distinct_norms:
                p.uniform_(0.5, 1.5)
    return model


def width_2b(args) -> None:
    torch.manual_seed(0)
    results = {}
    for layers in args.width_2b:
        model = model_2b(layers)
        params = sum(p.numel() for p in model.parameters())
        for embedding in args.embeddings:
            with tempfile.TemporaryDirectory() as tmp:
                pkg = Path(tmp) / "m.mlpackage"
                seconds = build(random_weights(model, embedding), model.cfg, 2048, 128, embedding, pkg)
                size = weight_file(pkg).stat().st_size
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
            results[(layers, embedding)] = (params, size)
            print(json.dumps({"layers": layers, "embedding": embedding, "parameters": params,
                              "weight_bin": size, "bytes_per_param": round(size / params, 4),
                              "build_s": round(seconds, 1), "peak_rss_gb": round(rss, 2)}), flush=True)
        del model
    if len(args.width_2b) < 2:
        return
    a, b = sorted(args.width_2b)[:2]
    for embedding in args.embeddings:
        (pa, sa), (pb, sb) = results[(a, embedding)], results[(b, embedding)]
        per_layer_b, per_layer_p = (sb - sa) / (b - a), (pb - pa) / (b - a)
        size40, params40 = sa + (40 - a) * per_layer_b, pa + (40 - a) * per_layer_p
        print(f"{embedding}: weight.bin = {sa - a * per_layer_b:.0f} + {per_layer_b:.0f} x layers; "
              f"40 layers: {size40 / 1e9:.4f} GB / {params40 / 1e9:.4f} G params = "
              f"{size40 / params40:.4f} bytes/param")


class RSSMonitor:
    """Samples /proc/self/status in a thread; peak VmRSS and peak RssAnon (GB) per stage label.

    RssAnon excludes file-backed pages (memory-mapped weights, which the kernel can drop and read
    again): it is the memory the machine must actually provide."""

    def __init__(self, interval: float = 0.02):
        import threading
        self.label, self.peaks, self.anon, self.order = "start", {}, {}, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)
        self._thread.start()

    @staticmethod
    def rss() -> tuple[float, float]:
        """(VmRSS, RssAnon) in GB."""
        vals = {}
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "RssAnon:")):
                    vals[line.split(":")[0]] = int(line.split()[1]) / 2**20
        return vals.get("VmRSS", 0.0), vals.get("RssAnon", 0.0)

    def _run(self, interval: float) -> None:
        while not self._stop.is_set():
            self._record(self.rss())
            time.sleep(interval)

    def _record(self, gb: tuple[float, float]) -> None:
        label = self.label
        if label not in self.peaks:
            self.order.append(label)
        self.peaks[label] = max(self.peaks.get(label, 0.0), gb[0])
        self.anon[label] = max(self.anon.get(label, 0.0), gb[1])

    def stage(self, label: str) -> None:
        self._record(self.rss())
        self.label = label
        self._record(self.rss())

    def stop(self) -> tuple[dict, dict]:
        """({stage: peak VmRSS}, {stage: peak RssAnon})"""
        self._record(self.rss())
        self._stop.set()
        self._thread.join()
        return ({k: round(self.peaks[k], 2) for k in self.order},
                {k: round(self.anon[k], 2) for k in self.order})


def mem_one(layers: int, embedding: str, verify_steps: int) -> dict:
    """Peak RSS per stage of one 2B-width conversion (run in a fresh process)."""
    import gc
    from targets.coreml.verify import numerics
    mon = RSSMonitor()
    mon.stage("model build")
    torch.manual_seed(0)
    model = model_2b(layers, distinct_norms=True)
    cfg = model.cfg
    names = list(model.state_dict())
    mon.stage("quantize (round to nearest)")
    tensors = random_weights(model, embedding)
    del model       # as the ios target does: only the shipped weights stay
    gc.collect()
    fn = {"name": ""}

    def progress(stage, _msg):
        if stage in ("prefill", "decode"):
            fn["name"] = stage
            return
        label = stage if stage in ("merge", "spill") else f"{fn['name']} {stage}"
        mon.stage(label)

    with tempfile.TemporaryDirectory() as tmp:
        pkg = Path(tmp) / "m.mlpackage"
        t = time.perf_counter()
        mon.stage("wrapper + spill")
        build(tensors, cfg, 2048, 128, embedding, pkg, progress)
        build_s = time.perf_counter() - t
        size = weight_file(pkg).stat().st_size
        mon.stage("after build")
        del tensors
        gc.collect()
        mon.stage("verify")
        t = time.perf_counter()
        try:
            interp = Interpreter.from_package(pkg)
            report = numerics(interp, cfg, names, list(range(1, 140)), 2048, 128, verify_steps)
            verified = {"tokens_match": report.tokens_match,
                        "max_abs_logit_diff": round(report.max_abs_logit_diff, 4)}
        except Exception as e:   # noqa: BLE001  (record how verification failed, keep the peaks)
            verified = {"verify_error": f"{type(e).__name__}: {str(e)[:160]}"}
        verify_s = time.perf_counter() - t
    peaks, anon = mon.stop()
    return {"layers": layers, "embedding": embedding, "weight_bin": size, "build_s": round(build_s, 1),
            "verify_s": round(verify_s, 1), **verified,
            "peak_rss_gb": max(peaks.values()), "peak_anon_gb": max(anon.values()),
            "stages": peaks, "stages_anon": anon,
            "ru_maxrss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}


def mem(args) -> None:
    import subprocess
    results = []
    for layers in args.mem:
        for embedding in args.embeddings:
            out = subprocess.run([sys.executable, __file__, "--mem-one", str(layers), "--embeddings",
                                  embedding, "--verify-steps", str(args.verify_steps)],
                                 check=True, capture_output=True, text=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            results.append(r)
            print(json.dumps(r), flush=True)
    for embedding in args.embeddings:
        import numpy as np
        for key in ("peak_rss_gb", "peak_anon_gb"):
            pts = sorted((r["layers"], r[key]) for r in results if r["embedding"] == embedding)
            if len(pts) < 2:
                continue
            slope, fixed = np.polyfit([p[0] for p in pts], [p[1] for p in pts], 1)
            print(f"{embedding} {key}: {fixed:.2f} GB + {slope:.3f} GB x layers; "
                  f"40 layers: {fixed + 40 * slope:.1f} GB (fit of {pts})")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--eval-text", default="/work/shared/eval/python-tutorial.txt")
    ap.add_argument("--windows", type=int, default=12)
    ap.add_argument("--embeddings", nargs="+", default=None, choices=["lut6", "int8", "int4"])
    ap.add_argument("--width-2b", nargs="+", type=int, metavar="LAYERS")
    ap.add_argument("--mem", nargs="+", type=int, metavar="LAYERS")
    ap.add_argument("--mem-one", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--verify-steps", type=int, default=32)
    args = ap.parse_args()
    if args.mem_one:
        print(json.dumps(mem_one(args.mem_one, (args.embeddings or ["lut6"])[0], args.verify_steps)))
        return
    if args.mem:
        args.embeddings = args.embeddings or ["lut6"]
        mem(args)
        return
    if args.width_2b:
        args.embeddings = args.embeddings or ["lut6", "int8"]
        width_2b(args)
    else:
        args.embeddings = args.embeddings or ["lut6", "int8", "int4"]
        quality(args)


if __name__ == "__main__":
    main()
