"""Compile the `tiny` recipe's TVM model libraries (android aarch64 system lib + x86_64 host) into
OUT_DIR, exactly as targets/tvm/target.py does; run as a script so each build is a fresh process."""
import json
import sys
from pathlib import Path

from exporter.config import MiniCPMConfig
from exporter.recipes import get_recipe
from targets.tvm import pipeline


def main(out: Path) -> None:
    rec = get_recipe("tiny")
    cfg = MiniCPMConfig.from_hf(json.loads((rec.embedded_path / "config.json").read_text()), "config.json")
    triple = pipeline.TRIPLES["android"]
    for name, tgt, prefix in (("cpu", {"kind": "llvm", "mtriple": triple}, pipeline.system_lib_prefix(rec.name)),
                              ("host", pipeline.HOST_TARGET, None)):
        target = pipeline.make_target("cpu", tgt)
        mod, _ = pipeline.export_ir(cfg, rec.quantization, target, {"recipe": rec.name})
        ex = pipeline.compile_ir(mod, target, prefix=prefix)
        (out / name).mkdir(parents=True, exist_ok=True)
        if prefix:
            pipeline.save_tar(ex, out / name / "model.tar")
        pipeline.save_so(ex, out / name / "model.so", triple if prefix else "x86_64")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
