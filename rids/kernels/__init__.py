"""Fused GPU kernels (Triton), imported lazily: the CPU path never needs triton.

`kernels` (an engine option): torch, triton, or auto (Triton on CUDA when it is installed).
Forcing triton on a CPU is for tests: the same kernels run in Triton's interpreter
(`TRITON_INTERPRET=1`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from importlib.util import find_spec
from types import ModuleType

import torch

from rids.errors import RidsError


def use_triton(kernels: str, device: torch.device) -> bool:
    has_triton = find_spec("triton") is not None
    if kernels == "torch" or (kernels == "auto" and (device.type != "cuda" or not has_triton)):
        return False
    if not has_triton:
        raise RidsError("kernels=triton needs Triton: pip install 'rids[gpu]'")
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RidsError(
            f"kernels=triton on {device.type} runs only in Triton's interpreter "
            "(TRITON_INTERPRET=1, for tests); use kernels=torch"
        )
    return True


def lora_kernel(kernels: str, device: torch.device) -> Callable | None:
    """The gated-LoRA kernel (`GatedLinear.lora_kernel`); None: PyTorch."""
    if not use_triton(kernels, device):
        return None
    from rids.kernels.lora import gated_lora_layer_

    return gated_lora_layer_


def verify_kernels(kernels: str, device: torch.device) -> ModuleType | None:
    """`rids.kernels.verify` (greedy_verify, sampled_verify); None: PyTorch."""
    if not use_triton(kernels, device):
        return None
    from rids.kernels import verify

    return verify
