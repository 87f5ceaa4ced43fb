"""--torch_compile / --dynamo_backend: the U-Net (with the adapters wrapped into it) compiled by torch.compile.

The whole forward is one graph: adapters read their scale from a number fixed before compiling (freeze_alpha), not
from a tensor, so nothing in a step breaks the graph (tests/training/test_compiling.py counts). A new bucket shape
compiles once more, after which dynamo treats the sizes as dynamic. sd-scripts compiles through accelerate's
dynamo_backend; the backends and their default are its.
"""

from __future__ import annotations

import importlib.util

from library.errors import UserError

# Backends torch lists whose package comes separately: checked before training, not at the first step's compile.
BACKEND_PACKAGES = {"tvm": "tvm", "onnxrt": "onnxruntime", "tensorrt": "torch_tensorrt", "fx2trt": "torch_tensorrt",
                    "ipex": "intel_extension_for_pytorch", "openxla": "torch_xla"}


def compile_unet(config, parts, method, say=print) -> None:
    backend = config.get("dynamo_backend") or "inductor"
    import torch._dynamo  # imported only when compiling

    available = torch._dynamo.list_backends(exclude_tags=())
    if backend not in available:
        raise UserError(f"--dynamo_backend {backend} is not available in this torch (it has: {', '.join(available)}); "
                        "pick one of those (inductor compiles, eager and aot_eager only trace)")
    package = BACKEND_PACKAGES.get(backend)
    if package is not None and importlib.util.find_spec(package) is None:
        raise UserError(f"--dynamo_backend {backend} needs the {package} package, which is not installed: install it "
                        "or use --dynamo_backend inductor")
    if backend == "cudagraphs" and not torch.cuda.is_available():
        raise UserError("--dynamo_backend cudagraphs needs a CUDA GPU; use inductor here")
    for module in method.sampling_modules():
        for adapter in module.modules():
            if hasattr(adapter, "freeze_alpha"):
                adapter.freeze_alpha()
    parts.unet.compile(backend=backend)
    say(f"torch.compile: the U-Net{' and its adapters' if method.sampling_modules() else ''} compile with the "
        f"{backend} backend at the first step (and once more for a new bucket shape)")
