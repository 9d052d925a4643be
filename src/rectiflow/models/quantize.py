"""Int8 weight quantisation for CPU inference, applied to a built model.

`quantize_int8(model)` swaps every `nn.Linear` for PyTorch's dynamically quantised linear
(`torch.ao.quantization.quantize_dynamic`): weights are stored as int8 with one scale per output channel,
activations are quantised per batch on the fly, and the matmul runs in int8 (fbgemm / oneDNN kernels).
Only the x86 / ARM CPU backends implement these kernels, so this is a CPU inference option: the model
must be float32 and on the CPU. Everything that is not an `nn.Linear` (norms, embeddings tables, convs)
stays float32.

Why this and not torchao: torchao (PyPI) targets GPU kernels and torch.compile; its CPU int8 path needs
compilation to be fast, whereas PyTorch's built-in dynamic quantisation is eager, ships with torch, and
measured ~2.5-2.8x faster than fp32 for FLUX-sized linears on this 2-core machine (benchmarks/int8_speed.py).
`torch.ao.quantization` prints deprecation warnings in torch 2.x; they are silenced here, and if a later torch
removes the module the error says what to do.
"""

from __future__ import annotations

import logging
import warnings

import torch
from torch import nn

from rectiflow.errors import RectiflowError

log = logging.getLogger(__name__)


def _quantize_dynamic_fn():
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear
            from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
    except ImportError as e:  # pragma: no cover - depends on the torch build
        raise RectiflowError(
            f"int8 quantisation needs torch.ao.quantization, which this torch {torch.__version__} lacks; "
            "run without --int8 (or use a torch version that ships it)"
        ) from e

    class Int8Linear(DynamicQuantizedLinear):
        """PyTorch's dynamic int8 linear, plus `.weight` / `.bias` as float tensors (like nn.Linear's).

        Calling the module runs the int8 kernel. Code that reads `linear.weight` directly instead of calling
        the module (a fused fast path in a block's forward) gets the dequantised float32 weight, so it
        stays correct, at fp32 speed for that layer.
        """

        @property
        def weight(self) -> torch.Tensor:  # type: ignore[override]
            return self._weight_bias()[0].dequantize()

        @property
        def bias(self) -> torch.Tensor | None:  # type: ignore[override]
            return self._weight_bias()[1]

        def extra_repr(self) -> str:
            return f"in_features={self.in_features}, out_features={self.out_features}, dtype=qint8"

    return quantize_dynamic, per_channel_dynamic_qconfig, Int8Linear


def is_quantized(model: nn.Module) -> bool:
    """True when `model` contains dynamically quantised linears (made by `quantize_int8`)."""
    return any(".quantized." in type(m).__module__ for m in model.modules())


def quantize_int8(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Return `model` with every `nn.Linear` replaced by an int8 dynamically quantised linear.

    The model must be a float32 model on the CPU (raises RectiflowError otherwise) and is put in eval mode:
    the quantised layers are for inference only. Weights are quantised per output channel (symmetric int8),
    which keeps the error of layers with a few large-norm rows low. With `inplace=False` (default) the
    input model is left untouched and a quantised copy is returned.
    """
    params = list(model.parameters())
    if not params:
        raise RectiflowError("quantize_int8: the model has no parameters to quantise")
    devices = {p.device.type for p in params}
    dtypes = {p.dtype for p in params}
    if devices != {"cpu"}:
        raise RectiflowError(
            f"int8 quantisation runs on the CPU only, but the model is on {sorted(devices)}; "
            "drop --int8 on GPU (use --dtype bf16 there)"
        )
    if dtypes != {torch.float32}:
        names = sorted(str(d).replace("torch.", "") for d in dtypes)
        raise RectiflowError(
            f"int8 quantisation needs a float32 model, got {names}; load it with dtype fp32 before quantising"
        )
    if is_quantized(model):
        raise RectiflowError("quantize_int8: the model is already quantised")
    quantize_dynamic, qconfig, int8_linear = _quantize_dynamic_fn()
    n_linear = sum(isinstance(m, nn.Linear) for m in model.modules())
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = quantize_dynamic(model, {nn.Linear: qconfig}, dtype=torch.qint8,
                             mapping={nn.Linear: int8_linear}, inplace=inplace)
    log.debug("quantised %d linear layers to int8 (dynamic, per-channel)", n_linear)
    return q
