"""Host benchmark of the llama-bench workloads: one MiniCPM-2B-shaped int4 model, every engine, 2 threads.

    python3 bench/decode_host.py [--engines mcpm,llama.cpp,llama.cpp-passive,llama.cpp-thp,llama.cpp-norepack,onnxruntime,torch]
        [--json] [--threads 2] [--prompt-tokens 512] [--new-tokens 128] [--depths 0,1024] [--reps 3] [--checkpoint DIR]

Workloads (llama-bench's names): pp<P> = prefill P prompt tokens from an empty context; tg<N>@d<P> = N
decode steps right after that prompt; tg<N> = N decode steps at depth 0 and tg<N>@d<D> after a D-token
context, for each --depths D. Same random-weight checkpoint (bench/make_2b_checkpoint.py), same token
ids, greedy. Engines and their settings: bench/host_engines.py (every engine in its best documented
configuration; `llama.cpp-passive`, `llama.cpp-thp` and `llama.cpp-norepack` are extra, labelled rows). Each
repetition runs every engine once,
in its own process, engines interleaved (rep 1: A B C, rep 2: A B C, ...); each process warms up once.
Reported per engine and workload: median and min-max tok/s over the repetitions.
Roofline: STREAM-like C read (bench/kernel_stream.c `read`, 1 GiB, same threads) divided by the bytes
one decoded token reads (int4 weights + fp16 scales incl. the tied head + the KV cache of the context, in
the mcpm build's KV dtype), for tg<N>@d<P>. A shared machine's read bandwidth swings between runs (29.9
to 46.1 GB/s within one 9-read measurement here), so the read is taken right before every engine run
(best of 5) and each run is set against its own: % roofline per run, median and min-max; plus 9 reads
at the end.
JSON (--json): engines.NAME.prefill_tok_s / decode_tok_s (medians of pp<P> / tg<N>@d<P>, as scripts
expect), engines.NAME.workloads.W = {median, min, max, runs}, engines.NAME.roofline_pct = {median, min,
max, runs} with engines.NAME.read_gb_s (the read before each run), bandwidth (the final reads),
roofline, load averages.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from host_engines import ENGINE_ENV, ENGINES, Plan, log, workload_names, worker_json  # noqa: E402


# ---------------------------------------------------------------- model + roofline
def load_quantized(ckpt: Path):
    """(config, q4f16 QuantizedModel) of the checkpoint; the quantized arrays are cached next to it."""
    import numpy as np
    import torch

    from exporter.checkpoint import open_checkpoint
    from exporter.config import MiniCPMConfig
    from exporter.quant import SCHEMES, QTensor, QuantizedModel, quantize_state_dict

    cfg = MiniCPMConfig.from_hf(json.loads((ckpt / "config.json").read_text()))
    cache = ckpt.with_name(ckpt.name + ".q4f16.npz")
    if cache.exists():
        z = np.load(cache)
        qm = QuantizedModel(SCHEMES["q4f16"])
        for key in z.files:
            name, _, part = key.partition("|")
            if part == "data":
                qm.tensors[name] = QTensor(4, z[key], z[name + "|scale"])
            elif not part:
                qm.tensors[name] = z[key]
        return cfg, qm
    state = open_checkpoint(ckpt).text_tensors(cfg, dtype=torch.bfloat16)
    qm = quantize_state_dict(state, "q4f16", search=False)
    arrays = {}
    for name, v in qm.tensors.items():
        if isinstance(v, QTensor):
            arrays[name + "|data"], arrays[name + "|scale"] = v.data, v.scale
        else:
            arrays[name] = v
    tmp = cache.with_name(cache.name + ".partial.npz")
    np.savez(tmp, **arrays)
    tmp.rename(cache)
    return cfg, qm


def bytes_per_token(cfg, qm, context: int) -> int:
    """Bytes one decode step reads at ``context``: int4 weights + scales and the KV cache (mcpm's dtype)."""
    from targets.tvm.model import KV_DTYPE, kv_cache_bytes

    from exporter.quant import QTensor

    weights = sum(v.nbytes for v in qm.tensors.values() if isinstance(v, QTensor))
    if not cfg.tie_word_embeddings:       # the embedding table is only gathered, the head is read
        weights -= qm.tensors["tok_embeddings.weight"].nbytes
    return weights + kv_cache_bytes(cfg, context, KV_DTYPE)


# ---------------------------------------------------------------- main


# ---------------------------------------------------------------- main
def _stats(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 2), "min": round(min(values), 2),
            "max": round(max(values), 2), "runs": [round(v, 2) for v in values]}


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engines", default="mcpm,llama.cpp,llama.cpp-norepack,onnxruntime")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--depths", default="0,1024", help="tg<N> contexts (comma list; '' for none)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--checkpoint", type=Path, default=None)
    ap.add_argument("--workdir", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)   # one engine, in its own process
    args = ap.parse_args(argv)
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    bad = [e for e in engines if e not in ENGINES]
    if bad:
        ap.error(f"unknown engine '{bad[0]}' (known: {', '.join(ENGINES)})")
    depths = tuple(int(d) for d in args.depths.split(",") if d.strip())
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)

    from make_2b_checkpoint import make_checkpoint

    ckpt = make_checkpoint(args.checkpoint) if args.checkpoint else make_checkpoint()
    cfg, qm = load_quantized(ckpt)
    import numpy as np

    ids = [1] + [int(t) for t in np.random.default_rng(0).integers(3, 8000, max(args.prompt_tokens, *depths, 1))]
    plan = Plan(prompt=ids[:args.prompt_tokens], new=args.new_tokens, depths=depths, depth_ids=ids)
    if args.worker:
        print(worker_json(args.worker, cfg, qm, plan, args.threads, args.workdir, ckpt))
        return {}

    import kernel_stream

    names = workload_names(args.prompt_tokens, args.new_tokens, depths)
    runs: dict[str, dict[str, list[float]]] = {e: {w: [] for w in names} for e in engines}
    reads: dict[str, list[float]] = {e: [] for e in engines}      # GB/s right before each run
    first, errors, loads = {}, {}, [_load()]
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.reps):
            for name in engines:
                if name in errors:
                    continue
                read = kernel_stream.read_bandwidth(args.threads, reps=5)["best"]
                log(f"rep {rep + 1}/{args.reps}: {name} (own process), load {_load()}, read {read} GB/s")
                cmd = [sys.executable, __file__, "--worker", name, "--threads", str(args.threads), "--prompt-tokens",
                       str(args.prompt_tokens), "--new-tokens", str(args.new_tokens), "--depths", args.depths,
                       "--checkpoint", str(ckpt), "--workdir", tmp]
                proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **ENGINE_ENV.get(name, {})})
                if proc.returncode != 0:
                    errors[name] = (proc.stderr.strip().splitlines() or ["?"])[-1]
                    log(f"{name} failed: {errors[name]}")
                    continue
                res = json.loads(proc.stdout.strip().splitlines()[-1])
                first[name] = res.pop("first_tokens")
                reads[name].append(read)
                for w, r in res.items():
                    runs[name][w].append(r["tokens"] / r["s"])
                log(f"{name}: " + ", ".join(f"{w} {runs[name][w][-1]:.2f}" for w in names))
            loads.append(_load())
    bw = kernel_stream.read_bandwidth(args.threads)
    per_tok = bytes_per_token(cfg, qm, args.prompt_tokens + args.new_tokens // 2)
    from targets.tvm.model import KV_DTYPE

    result = {"engines": {}, "workloads": names, "bandwidth_gb_s": bw["best"], "bandwidth": bw,
              "roofline_tok_s": round(bw["best"] * 1e9 / per_tok, 2), "bytes_per_token": per_tok,
              "kv_dtype": KV_DTYPE, "threads": args.threads, "prompt_tokens": args.prompt_tokens,
              "new_tokens": args.new_tokens, "depths": list(depths), "reps": args.reps, "load_avg": loads}
    pp, tg = names[0], names[1]
    for name in engines:
        if name in errors and not runs[name][pp]:
            result["engines"][name] = {"error": errors[name]}
            continue
        wl = {w: _stats(v) for w, v in runs[name].items() if v}
        pct = [100 * tok_s * per_tok / (gb_s * 1e9) for tok_s, gb_s in zip(runs[name][tg], reads[name])]
        result["engines"][name] = {"prefill_tok_s": wl[pp]["median"], "decode_tok_s": wl[tg]["median"],
                                   "workloads": wl, "roofline_pct": _stats(pct), "read_gb_s": reads[name],
                                   "first_tokens": first.get(name)}
    if args.json:
        print(json.dumps(result))
    else:
        print(table(result))
    return result


def table(result: dict) -> str:
    """Markdown table: median (min-max) tok/s per engine and workload, % of the roofline for tg at depth P."""
    names = result["workloads"]
    lines = [f"| engine | {' | '.join(names)} | {names[1]} % roofline (per run) | first tokens |",
             "|---" * (len(names) + 3) + "|"]
    for name, r in result["engines"].items():
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error']} |")
            continue
        cells = [f"{r['workloads'][w]['median']:.2f} ({r['workloads'][w]['min']:.2f}-{r['workloads'][w]['max']:.2f})"
                 if w in r["workloads"] else "-" for w in names]
        pct = r["roofline_pct"]
        lines.append(f"| {name} | {' | '.join(cells)} | {pct['median']:.0f}% ({pct['min']:.0f}-{pct['max']:.0f}%) | "
                     f"{r['first_tokens']} |")
    bw = result["bandwidth"]
    before = [g for r in result["engines"].values() for g in r.get("read_gb_s", [])]
    lines.append(f"\n% roofline per run: tok/s x {result['bytes_per_token'] / 1e9:.3f} GB per token (KV "
                 f"{result['kv_dtype']}) / the STREAM-like read right before that run (best of 5; "
                 f"{min(before, default=0)}-{max(before, default=0)} GB/s over the runs). At the end: best "
                 f"{bw['best']} GB/s of {len(bw['runs'])} (median {bw['median']}, min {bw['min']}) = "
                 f"{result['roofline_tok_s']} tok/s. Load average {result['load_avg']}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
