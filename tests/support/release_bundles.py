"""Bundles assembled by hand with exporter.bundle.Staging around real TVM libraries (a small Relax
module compiled for aarch64-linux-android as a system library, and for x86_64): verify/release tests."""
import json
import shutil
from pathlib import Path

from exporter.bundle import Staging, tool_versions


def compile_libs(out: Path, prefix: str) -> None:
    """lib/cpu/model.tar + .so (aarch64 system library under ``prefix``) and lib/host/model.so."""
    import tvm
    from tvm import relax
    from tvm.script import relax as R

    from targets.tvm.pipeline import save_so, save_tar

    @tvm.script.ir_module
    class Mod:
        @R.function
        def embed(x: R.Tensor((4,), "float32")):
            return R.add(x, x)

    arm = tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-android", "mattr": ["+neon"]})
    ex = relax.build(Mod.with_attr("system_lib_prefix", prefix), arm, system_lib=True)
    (out / "lib" / "cpu").mkdir(parents=True)
    (out / "lib" / "host").mkdir(parents=True)
    save_tar(ex, out / "lib" / "cpu" / "model.tar")
    save_so(ex, out / "lib" / "cpu" / "model.so", "aarch64-linux-android")
    host = relax.build(Mod, tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-pc-linux-gnu"}))
    save_so(host, out / "lib" / "host" / "model.so", "x86_64")


def build_libs(root: Path) -> Path:
    """root/tiny/lib (prefix mcpm_tiny_) and root/other/lib (prefix mcpm_other_)."""
    compile_libs(root / "tiny", "mcpm_tiny_")
    compile_libs(root / "other", "mcpm_other_")
    return root


def assemble_bundle(dest: Path, libs: Path, prefix_libs: str = "tiny", manifest_extra: dict | None = None,
                    chat_config: dict | None = None) -> Path:
    with Staging(dest, force=True) as st:
        shutil.copytree(libs / prefix_libs / "lib", st.dir / "lib")
        (st.dir / "params_shard_0.bin").write_bytes(bytes(range(256)) * 64)
        (st.dir / "mlc-chat-config.json").write_text(json.dumps(chat_config or
            {"model_lib": "mcpm_tiny", "mcpm": {"libs": {"cpu": {"prefix": "mcpm_tiny_"}, "host": {}}}}))
        manifest = {
            "mcpm_export_version": "0.1.0", "recipe": "tiny", "target": "android",
            "quantization": {"scheme": "q4f16_e8"}, "quality": {}, "source": {"checkpoint_fingerprint": "x" * 16},
            "versions": tool_versions(), "system_lib_prefix": "mcpm_tiny_", "triple": "aarch64-linux-android",
            "backends": ["cpu"], "libs": {"cpu": {"tar": "lib/cpu/model.tar", "so": "lib/cpu/model.so",
                                                  "prefix": "mcpm_tiny_"},
                                          "host": {"so": "lib/host/model.so"}},
            **(manifest_extra or {}),
        }
        return st.finalize(manifest)


def assemble_ios_bundle(dest: Path, coreml: dict | None = None) -> Path:
    """An ios bundle around a real (tiny, one-function, iOS18) Core ML package."""
    import coremltools as ct
    import numpy as np
    import torch

    model = torch.jit.trace(torch.nn.Linear(4, 2).eval(), torch.zeros(1, 4))
    mlmodel = ct.convert(model, inputs=[ct.TensorType(name="x", shape=(1, 4), dtype=np.float32)],
                         minimum_deployment_target=ct.target.iOS18, convert_to="mlprogram")
    with Staging(dest, force=True) as st:
        mlmodel.save(str(st.dir / "M.mlpackage"))
        (st.dir / "tokenizer.model").write_bytes(b"sp")
        return st.finalize({
            "mcpm_export_version": "0.1.0", "recipe": "tiny", "target": "ios", "backend": "coreml",
            "quantization": {"scheme": "q4f16_e8"}, "quality": {}, "source": {"checkpoint_fingerprint": "x" * 16},
            "versions": tool_versions(),
            "coreml": {"package": "M.mlpackage", "minimum_deployment_target": "iOS18",
                       "functions": {"main": {}}, **(coreml or {})}})
