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

import timm
import torch.nn as nn

from rowcol.errors import ModelNameError

__all__ = ['PeSpec', 'register_pe', 'pe_spec', 'pe_models', 'dense_twin', 'create_model', 'check_model_name',
           'model_defaults', 'check_pretrained', 'CIFAR10_MEAN', 'CIFAR10_STD']

# Per-channel normalisation of the 32-px (CIFAR-10) models' pretrained cfgs
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


@dataclass(frozen=True)
class PeSpec:
    name: str
    dense: str
    params: int | None = None
    params_headless: int | None = None
    dense_params: int | None = None


_PE_SPECS: dict[str, PeSpec] = {}


def register_pe(name: str, dense: str, params: int | None = None,
                params_headless: int | None = None, dense_params: int | None = None) -> None:
    _PE_SPECS[name] = PeSpec(name, dense, params, params_headless, dense_params)


def pe_spec(name: str) -> PeSpec | None:
    """The spec of a PE model, or None for a model that is not one of rowcol's PE models."""
    return _PE_SPECS.get(name)


def pe_models() -> list[str]:
    """Names of every registered PE model, sorted."""
    return sorted(_PE_SPECS)


def dense_twin(name: str) -> str | None:
    """The dense twin of a PE model (None if ``name`` is not a PE model)."""
    spec = _PE_SPECS.get(name)
    return spec.dense if spec else None


def check_model_name(name: str) -> None:
    """Raise ``ModelNameError`` (with close names) unless ``name`` is in timm's registry."""
    if not timm.is_model(name):
        names = list(dict.fromkeys(pe_models() + timm.list_models()))
        close = difflib.get_close_matches(name, names, n=4, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else '; `rowcol params` lists the PE models'
        raise ModelNameError(f"unknown model '{name}'{hint}")


def model_defaults(name: str) -> dict:
    """The model's pretrained cfg (input_size, mean, std, ...) as a dict, without building it."""
    check_model_name(name)
    cfg = timm.get_pretrained_cfg(name)
    return cfg.to_dict() if cfg is not None else {'input_size': (3, 224, 224), 'mean': (0.485, 0.456, 0.406),
                                                  'std': (0.229, 0.224, 0.225)}


def create_model(name: str, img_size: int | None = None, **kwargs) -> nn.Module:
    """``timm.create_model`` with a clear error for an unknown name.

    ``img_size`` goes to models that take it (ViTs fix their position embedding to it);
    CNNs take any size and ignore it.
    """
    check_model_name(name)
    if img_size is not None:
        try:
            return timm.create_model(name, img_size=img_size, **kwargs)
        except TypeError as e:
            if 'img_size' not in str(e):
                raise
    return timm.create_model(name, **kwargs)


def check_pretrained(variant: str, pretrained: bool, kwargs: dict) -> None:
    """rowcol hosts no weights: ``pretrained=True`` needs a local file, given timm's way
    (``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=PATH))``)."""
    if not pretrained:
        return
    overlay = kwargs.get('pretrained_cfg_overlay') or {}
    cfg = kwargs.get('pretrained_cfg')
    cfg_file = cfg.get('file') if isinstance(cfg, dict) else getattr(cfg, 'file', None)
    if not (overlay.get('file') or cfg_file):
        raise ValueError(f'{variant}: rowcol hosts no pretrained weights; pass a local file the timm way, '
                         "pretrained_cfg_overlay=dict(file='model.safetensors'), or train one (rowcol train)")
