"""A quantised base model: its linear layers replaced by bitsandbytes' 4-bit (NF4) or 8-bit layers.

diffusers quantises a model while loading it (`from_pretrained(..., quantization_config=BitsAndBytesConfig(...))`),
but refuses to without a GPU. Replacing the layers of a loaded model works on every device bitsandbytes supports,
the CPU included, so training scripts and tests use one code path. The layers are quantised when they are moved
to their device (bitsandbytes quantises on `.to()`), one layer at a time, so the full-precision copy of a large
model never needs to sit on the accelerator.
"""

from __future__ import annotations

import importlib.util

import torch
from torch import nn

QUANTIZATIONS = ("none", "nf4", "int8")


class QuantizationError(ValueError):
    """A quantised base cannot be made with this installation or device."""


def check_quantization(mode: str, device: torch.device | str) -> None:
    """Fail early, before any model loads, when `mode` cannot work here."""
    if mode not in QUANTIZATIONS:
        raise QuantizationError(f"Unknown quantisation {mode!r}; choose one of {', '.join(QUANTIZATIONS)}.")
    if mode == "none":
        return
    if importlib.util.find_spec("bitsandbytes") is None:
        raise QuantizationError(f"A {mode} base needs bitsandbytes: pip install bitsandbytes")
    if torch.device(device).type not in ("cpu", "cuda", "xpu"):
        raise QuantizationError(f"bitsandbytes cannot quantise on {torch.device(device).type}; use a CPU or a GPU.")


def _quantized_copy(linear: nn.Linear, mode: str, compute_dtype: torch.dtype) -> nn.Module:
    import bitsandbytes as bnb

    weight = linear.weight.data.to("cpu", torch.float32)
    bias = linear.bias
    if mode == "nf4":
        layer = bnb.nn.Linear4bit(
            linear.in_features, linear.out_features, bias is not None, compute_dtype=compute_dtype, quant_type="nf4"
        )
        layer.weight = bnb.nn.Params4bit(weight.to(compute_dtype), requires_grad=False, quant_type="nf4")
    else:
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias is not None, has_fp16_weights=False)
        layer.weight = bnb.nn.Int8Params(weight.to(compute_dtype), requires_grad=False, has_fp16_weights=False)
    if bias is not None:
        layer.bias = nn.Parameter(bias.data.to(compute_dtype), requires_grad=False)
    return layer


def quantize_linear_layers(
    model: nn.Module, mode: str, device: torch.device | str, compute_dtype: torch.dtype, keep: tuple[str, ...] = ()
) -> list[str]:
    """Replace every `nn.Linear` of `model` (except paths ending in an entry of `keep`) by a frozen NF4 or int8
    layer on `device`; returns the replaced paths. The other parameters are moved to `device` and
    `compute_dtype` too. With `mode="none"` only the move happens."""
    check_quantization(mode, device)
    replaced = []
    if mode != "none":
        targets = [
            (path, module)
            for path, module in model.named_modules()
            if type(module) is nn.Linear and not any(path == k or path.endswith("." + k) for k in keep)
        ]
        for path, linear in targets:
            parent_path, _, name = path.rpartition(".")
            parent = model.get_submodule(parent_path) if parent_path else model
            setattr(parent, name, _quantized_copy(linear, mode, compute_dtype).to(device))
            replaced.append(path)
    for parameter in model.parameters():
        if parameter.is_floating_point() and parameter.dtype != compute_dtype:
            parameter.data = parameter.data.to(compute_dtype)
    model.to(device)
    return replaced
