"""Quantized weights (FLUX_QUANTIZE, FLUX_TEXT_ENCODER_QUANTIZE) through torchao, and counting what
a module's weights take, quantized or not.

The linear layers are quantized in place (``torchao.quantization.quantize_``): the module keeps its
class (a ``LoraLinear`` stays one) and its weight becomes a torchao tensor that ``F.linear`` knows.
Per-request LoRA deltas then run beside it in the compute dtype (runners/lora/adapters.py):
``activate`` makes them in the model's dtype, never the weight's storage, and a quantized model
never fuses a batch's LoRAs into its weights (``load_model``). LoRAs configured at start-up
(FLUX_FUSED_LORAS) are fused first, in full precision, and quantized with the rest.

- ``fp8``: float8 activations and weights, scaled per row, multiplied by float8 tensor cores:
  compute capability 8.9 and above only (Ada, Hopper), refused elsewhere with that reason.
- ``fp8-weight``: float8 weights, scaled per row, widened to the compute dtype for the matmul.
- ``int8``: int8 weights, scaled per row (torchao's weight-only int8).
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

QUANTIZED = ("fp8", "fp8-weight", "int8")
FP8_MIN_CAPABILITY = (8, 9)


class QuantizationRefused(RuntimeError):
    """A FLUX_QUANTIZE choice this device cannot run; the message says why and what to use."""


def device_description(device: torch.device) -> str:
    if device.type != "cuda":
        return f"this server's device is the {device.type.upper()}"
    major, minor = torch.cuda.get_device_capability(device)
    return f"this GPU ({torch.cuda.get_device_name(device)}) has compute capability {major}.{minor}"


def check_supported(choice: str, device: torch.device, variable: str = "FLUX_QUANTIZE") -> None:
    """Refuse ``fp8`` (float8 matmuls) off GPUs of compute capability 8.9 and above."""
    if choice != "fp8":
        return
    if device.type == "cuda" and torch.cuda.get_device_capability(device) >= FP8_MIN_CAPABILITY:
        return
    raise QuantizationRefused(
        f"{variable}=fp8 multiplies in float8 (torchao's dynamic activation and weight quantization), which needs "
        f"float8 tensor cores: a GPU of compute capability 8.9 or above (Ada, Hopper); {device_description(device)}. "
        f"Use {variable}=fp8-weight (float8 weights, the same memory, compute in the model's dtype) or int8"
    )


def fp8_matmul_fits(module: torch.nn.Module) -> bool:
    """float8 matmuls (torch._scaled_mm) need both dimensions in multiples of 16: others stay unquantized."""
    return module.in_features % 16 == 0 and module.out_features % 16 == 0


def is_quantized_linear(module: torch.nn.Module, choice: str) -> bool:
    """Whether ``quantize`` turns this module's weight into a quantized tensor (the rule ``memory``
    counts by too)."""
    if choice not in QUANTIZED or not isinstance(module, torch.nn.Linear):
        return False
    return choice != "fp8" or fp8_matmul_fits(module)


def torchao_config(choice: str):
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        Float8WeightOnlyConfig,
        Int8WeightOnlyConfig,
        PerRow,
    )

    if choice == "fp8":
        return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
    if choice == "fp8-weight":
        return Float8WeightOnlyConfig()
    if choice == "int8":
        return Int8WeightOnlyConfig()
    raise ValueError(f"unknown quantization {choice!r}; choose none, {', '.join(QUANTIZED)}")


@torch.no_grad()
def quantize(module: torch.nn.Module, choice: str) -> int:
    """Quantize ``module``'s linear layers in place; returns how many. ``none`` does nothing."""
    if choice == "none":
        return 0
    from torchao.quantization import quantize_

    count = sum(1 for m in module.modules() if is_quantized_linear(m, choice))
    quantize_(module, torchao_config(choice), filter_fn=lambda m, _name: is_quantized_linear(m, choice))
    return count


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor holds; a torchao tensor counts its inner tensors (data, scales, zero points)."""
    flatten = getattr(type(tensor), "__tensor_flatten__", None)
    if flatten is not None and type(tensor) not in (torch.Tensor, torch.nn.Parameter):
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers, each shared tensor once."""
    seen: set[int] = set()
    total = 0
    for tensor in [*module.parameters(), *module.buffers()]:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor_bytes(tensor)
    return total
