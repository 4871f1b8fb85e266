"""The choices of the torch backend, in a module that does not import torch.

The server's ``--torch-dtype`` and ``--torch-compile`` offer these (plus ``auto``) without
importing torch, which the ONNX Runtime and Triton front ends never load.
"""

from __future__ import annotations

# Convolution precision name -> the torch dtype's attribute name.
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
# torch.compile modes, and "off" for eager.
COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
