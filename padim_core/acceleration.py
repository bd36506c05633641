"""Device choice and inference speed-ups, decided at run time."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable

import torch
from torch import nn

log = logging.getLogger(__name__)


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """`None` or "auto" -> the first CUDA device when there is one, else the CPU."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} requested but CUDA is not available; use 'cpu' or 'auto'")
    return device


def optimize_for_inference(module: nn.Module, example: torch.Tensor) -> Callable[[torch.Tensor], object]:
    """A faster callable equivalent to `module` for inputs shaped like `example` (any batch size).

    Convolutions run channels-last. On the CPU the module is also traced and frozen (constant
    weights folded, batch norms fused into the convolutions), so each call runs fewer and
    cheaper kernels than eager mode, without Python in between; if tracing fails the eager
    module is used, so this only ever changes speed, never results beyond float rounding.
    """
    module = module.eval().to(memory_format=torch.channels_last)

    def channels_last(images: torch.Tensor) -> torch.Tensor:
        return images.contiguous(memory_format=torch.channels_last)

    if example.device.type != "cpu":
        return lambda images: module(channels_last(images))
    try:
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            frozen = torch.jit.freeze(torch.jit.trace(module, channels_last(example[:1].clone()), check_trace=False))
    except Exception as error:  # noqa: BLE001 (tracing is an optimisation: fall back to eager rather than fail)
        log.warning("could not trace %s (%s); running it eagerly", type(module).__name__, error)
        return lambda images: module(channels_last(images))
    return lambda images: frozen(channels_last(images))
