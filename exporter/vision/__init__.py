"""MiniCPM-V vision path: SigLIP ViT + perceiver resampler, LLaVA-UHD slicing, checkpoint loading.

config.py    VisionConfig (from config.json + recipe + the checkpoint's tensor shapes)
slicing.py   the LLaVA-UHD slice planner and the image-token prompt layout
preprocess.py numpy helpers shared by every runtime: normalise, patchify, interpolation tables
model.py     the PyTorch reference (timm/HF semantics) and the export form traced for TVM/ONNX
names.py     the vpm.* / resampler.* / llm.* name table
loader.py    open a MiniCPM-V checkpoint: vision state dict + canonical text state dict
onnx_ref.py  ONNX export of the vision path, run with onnxruntime (portable reference)
"""
