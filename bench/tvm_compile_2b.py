"""Time the android CPU (and optionally OpenCL/host) compile of a MiniCPM-2B-shaped model (no weights needed).

    python3.11 bench/tvm_compile_2b.py [cpu|opencl|host] [--no-kernels]

Prints seconds per stage; the requirement is <= 10 min per target on this machine (2 shared cores).
"""
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from exporter.config import MiniCPMConfig  # noqa: E402
from targets.tvm import pipeline  # noqa: E402
from targets.tvm.presets import get_preset  # noqa: E402

CFG_2B = MiniCPMConfig(hidden_size=2304, num_hidden_layers=40, num_attention_heads=36, num_key_value_heads=36,
                       intermediate_size=5760, vocab_size=122753, scale_emb=12, dim_model_base=256,
                       scale_depth=1.4, max_position_embeddings=2048)


def main():
    backend = sys.argv[1] if len(sys.argv) > 1 and not sys.argv[1].startswith("-") else "cpu"
    use_kernels = "--no-kernels" not in sys.argv
    if backend == "host":
        target = pipeline.make_target("cpu", pipeline.HOST_TARGET)
    else:
        target = pipeline.make_target(backend, get_preset("sd8gen2").llvm_target(pipeline.TRIPLES["android"]))
    t0 = time.perf_counter()
    mod, _ = pipeline.export_ir(CFG_2B, "q4f16_e8", target)
    t1 = time.perf_counter()
    ex = pipeline.compile_ir(mod, target, prefix=None if backend == "host" else "mcpm_2b_", use_kernels=use_kernels)
    t2 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        if backend == "host":
            pipeline.save_so(ex, Path(d) / "model.so", "x86_64")
        else:
            pipeline.save_tar(ex, Path(d) / "model.tar")
            pipeline.save_so(ex, Path(d) / "model.so", pipeline.TRIPLES["android"])
    t3 = time.perf_counter()
    print(f"2B {backend} kernels={use_kernels}: export_ir {t1 - t0:.1f}s  compile {t2 - t1:.1f}s  "
          f"write tar+so {t3 - t2:.1f}s  total {t3 - t0:.1f}s")


if __name__ == "__main__":
    main()
