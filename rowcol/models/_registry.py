"""Metadata of rowcol's models, kept as data: each PE model's dense twin and exact size.

A PE model's *dense twin* is the same architecture with every tie switched off (for
``resnet50_pe`` it is the standard ResNet-50 that the authors compare against). ``params``
is the exact parameter count at the model's default config (``num_classes`` and image size
of its pretrained cfg); ``params_headless`` the count with ``num_classes=0``. Tests assert
both against freshly built models.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Optional

import timm
import torch.nn as nn

from rowcol.errors import ModelNameError

__all__ = ['PeSpec', 'register_pe', 'pe_spec', 'pe_models', 'dense_twin', 'create_model']


@dataclass(frozen=True)
class PeSpec:
    name: str
    dense: str
    params: Optional[int] = None
    params_headless: Optional[int] = None
    dense_params: Optional[int] = None


_PE_SPECS: dict[str, PeSpec] = {}


def register_pe(name: str, dense: str, params: Optional[int] = None,
                params_headless: Optional[int] = None, dense_params: Optional[int] = None) -> None:
    _PE_SPECS[name] = PeSpec(name, dense, params, params_headless, dense_params)


def pe_spec(name: str) -> Optional[PeSpec]:
    """The spec of a PE model, or None for a model that is not one of rowcol's PE models."""
    return _PE_SPECS.get(name)


def pe_models() -> list[str]:
    """Names of every registered PE model, sorted."""
    return sorted(_PE_SPECS)


def dense_twin(name: str) -> Optional[str]:
    """The dense twin of a PE model (None if ``name`` is not a PE model)."""
    spec = _PE_SPECS.get(name)
    return spec.dense if spec else None


def create_model(name: str, **kwargs) -> nn.Module:
    """``timm.create_model`` with a clear error (and close names) for an unknown model."""
    if not timm.is_model(name):
        names = list(dict.fromkeys(pe_models() + timm.list_models()))
        close = difflib.get_close_matches(name, names, n=4, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else '; `rowcol params` lists the PE models'
        raise ModelNameError(f"unknown model '{name}'{hint}")
    return timm.create_model(name, **kwargs)
