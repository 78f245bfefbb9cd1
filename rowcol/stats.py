"""Parameter, MAC and tensor-byte counts, done once for the whole package.

Parameters are counted over ``model.parameters()``, which yields a shared Parameter once;
counting over ``state_dict()`` would count an aliased weight once per name. MACs come from
``torch.utils.flop_counter`` on a real forward pass (multiply-accumulates = FLOPs / 2), so a
tied W costs what both of its uses cost. Bytes of tensors are counted once per distinct view.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ['count_params', 'count_macs', 'input_size_of', 'tensor_bytes']


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of distinct parameters (a tied W counts once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct tensors among ``tensors``: tensors that view the same storage at the same
    offset with the same shape, stride and dtype (a tied W listed once per use, a Parameter and its
    ``.data``) count once; any other view (a slice, a transpose) counts its own ``numel`` bytes."""
    seen, total = set(), 0
    for t in tensors:
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def input_size_of(model: nn.Module, img_size: int | None = None) -> tuple[int, int, int]:
    """(C, H, W) from the model's pretrained cfg, with H = W = ``img_size`` when given."""
    c, h, w = getattr(model, 'pretrained_cfg', {}).get('input_size', (3, 224, 224))
    return (c, img_size, img_size) if img_size else (c, h, w)


@torch.no_grad()
def count_macs(model: nn.Module, input_size: tuple[int, int, int] | None = None) -> int:
    """Multiply-accumulates of one forward pass on one image."""
    input_size = input_size or input_size_of(model)
    was_training = model.training
    model.eval()
    try:
        x = torch.zeros(1, *input_size, device=next(model.parameters()).device)
        with FlopCounterMode(display=False) as fc:
            model(x)
    finally:
        model.train(was_training)
    return fc.get_total_flops() // 2
