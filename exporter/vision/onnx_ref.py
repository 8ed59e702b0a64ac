"""ONNX export of the vision path (the export form, dynamic patch count), run with onnxruntime.

A portable second implementation: the same three inputs as the TVM library (preprocess.py), so
any runtime with onnxruntime can check a phone's image features against it.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from ..errors import ExportError
from .model import MiniCPMVVision, VisionEncoder
from .preprocess import INPUT_NAMES, encoder_inputs

OPSET = 17


def export_onnx(vision: MiniCPMVVision, path: Path) -> Path:
    """Write ``path`` (weights inline below 2 GB, else next to it as external data)."""
    cfg = vision.cfg
    enc = VisionEncoder(vision).eval()
    n = 6 * 7
    args = (torch.zeros(n, 3 * cfg.patch ** 2), torch.zeros(n, cfg.pos_grid ** 2), torch.zeros(n, cfg.hidden))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(enc, args, str(path), input_names=list(INPUT_NAMES), output_names=["features"],
                          dynamic_axes={k: {0: "n"} for k in INPUT_NAMES}, opset_version=OPSET, dynamo=False)
    return path


class OnnxVision:
    """onnxruntime session over an exported vision ONNX file."""

    def __init__(self, path: Path, vcfg, key_pos: np.ndarray | None = None):
        import onnxruntime as ort
        if not Path(path).is_file():
            raise ExportError(f"{path}: ONNX vision model not found")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 2
        self.sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.cfg, self.key_pos = vcfg, key_pos

    def embed_one(self, image) -> np.ndarray:
        inp = encoder_inputs(image, self.cfg, self.key_pos)
        return self.sess.run(["features"], {k: inp[k] for k in INPUT_NAMES})[0]
