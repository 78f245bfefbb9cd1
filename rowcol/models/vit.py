"""ViT-PE: timm's Vision Transformer with the row/column-space tie in every block.

Paper: "Do deep neural networks utilize the weight space efficiently?" (arXiv 2401.16438,
HaLViT). Each block keeps timm's pre-norm layout and swaps two layers:

* MLP: ``Wᵀ GELU(W x + b1) + b2`` with W of shape (hidden, dim) (:class:`rowcol.layers.PeMlp`);
* attention: ``Q = W_q x``, ``K = W_kv x``, ``V = W_kvᵀ x``, output ``W_qᵀ``, biases of q, k,
  v and the projection kept (:class:`rowcol.layers.PeAttention`).

The dense twin of every ``vit_pe_*`` model is the timm ``vit_*`` model of the same name
without ``_pe`` (the same ``VisionTransformer`` with timm's ``Attention`` and ``Mlp``), so a
comparison changes nothing but the tie. Builder kwargs for ablations:

* ``attn_form``: ``'qo_kv'`` (authors, default), ``'qk_vo'``, ``'vo'``, or ``'dense'``
  (untied attention, tied MLP only);
* ``mlp_act``: ``'gelu'`` (default), ``'identity'`` (the paper's break condition) or ``'relu'``;
  dense models take it too, so a PE model and its twin can share the activation;
* ``tie_mlp=False``: an untied timm ``Mlp``;
* ``use_scale=True``: per-use channel scales, initialised to one (rowcol's addition, not the
  paper's): on both hidden sides and the output of the MLP's ``Wᵀ``, and on each of Q, K, V
  and the output projection; under 2 % of the parameters (1.6 % for the nano model).

Deviations from the paper: weight init is timm's (truncated normal, std 0.02) for W as for
the dense twin's Linear layers; the small-image models (32-px CIFAR, 16-px upsampled digits) are rowcol's CPU-sized additions, not the paper's.
"""
from __future__ import annotations

from functools import partial

import torch.nn as nn
from timm.layers import Attention, Mlp
from timm.models import build_model_with_cfg, register_model
from timm.models._registry import generate_default_cfgs
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

from rowcol.layers import PeMlp, pe_attention
from rowcol.models._registry import CIFAR10_MEAN, CIFAR10_STD, check_pretrained, dense_twin, register_pe

__all__ = ['VisionTransformer']

_MLP_ACTS = {'gelu': nn.GELU, 'identity': nn.Identity, 'relu': nn.ReLU}


def _create_vit(variant: str, pretrained: bool = False, pe: bool = True, attn_form: str = 'qo_kv',
                mlp_act: str = 'gelu', tie_mlp: bool = True, use_scale: bool = False,
                **kwargs) -> VisionTransformer:
    check_pretrained(variant, pretrained, kwargs)
    if mlp_act not in _MLP_ACTS:
        raise ValueError(f"{variant}: unknown mlp_act '{mlp_act}', expected one of {sorted(_MLP_ACTS)}")
    if pe:
        pe_mlp = partial(PeMlp, use_scale=True) if use_scale else PeMlp
        kwargs.setdefault('mlp_layer', pe_mlp if tie_mlp else Mlp)
        kwargs.setdefault('attn_layer', Attention if attn_form == 'dense' else pe_attention(attn_form, use_scale))
    elif attn_form != 'qo_kv' or not tie_mlp or use_scale:
        raise ValueError(f'{variant} is dense: attn_form, tie_mlp and use_scale apply to PE models only')
    kwargs.setdefault('act_layer', _MLP_ACTS[mlp_act])  # the same activation for a PE model and its twin
    model = build_model_with_cfg(
        VisionTransformer, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=3, feature_cls='getter'),
        **kwargs,
    )
    model.dense_twin = dense_twin(variant)  # None for the dense models registered here
    return model


def _cfg(**kwargs) -> dict:
    return {
        'url': '', 'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': None,
        'crop_pct': .9, 'interpolation': 'bicubic', 'fixed_input_size': True,
        'mean': (0.5, 0.5, 0.5), 'std': (0.5, 0.5, 0.5),
        'first_conv': 'patch_embed.proj', 'classifier': 'head', 'license': 'apache-2.0', **kwargs,
    }


_cifar = dict(num_classes=10, input_size=(3, 32, 32), crop_pct=1.0, mean=CIFAR10_MEAN, std=CIFAR10_STD)
default_cfgs = generate_default_cfgs({
    'vit_pe_tiny_patch16_224': _cfg(),
    'vit_pe_small_patch16_224': _cfg(),
    'vit_pe_base_patch16_224': _cfg(),
    'vit_tiny_patch4_32': _cfg(**_cifar),
    'vit_pe_tiny_patch4_32': _cfg(**_cifar),
    'vit_nano_patch4_32': _cfg(**_cifar),
    'vit_pe_nano_patch4_32': _cfg(**_cifar),
    'vit_small_patch4_32': _cfg(**_cifar),
    'vit_pe_small_patch4_32': _cfg(**_cifar),
    'vit_micro_patch4_16': _cfg(**dict(_cifar, input_size=(3, 16, 16), mean=(0.5,) * 3, std=(0.5,) * 3)),
    'vit_pe_micro_patch4_16': _cfg(**dict(_cifar, input_size=(3, 16, 16), mean=(0.5,) * 3, std=(0.5,) * 3)),
})

# Architectures. ImageNet sizes are timm's; the small-image sizes are rowcol's.
_NANO = dict(embed_dim=128, depth=6, num_heads=4)
_TINY = dict(embed_dim=192, depth=12, num_heads=3)
_SMALL = dict(embed_dim=384, depth=12, num_heads=6)
_BASE = dict(embed_dim=768, depth=12, num_heads=12)
_P4_32 = dict(patch_size=4, img_size=32)
_MICRO = dict(patch_size=4, img_size=16, embed_dim=96, depth=4, num_heads=3)

# name: (dense twin, exact params at the default cfg, params with num_classes=0)
register_pe('vit_pe_tiny_patch16_224', 'vit_tiny_patch16_224', 3_063_208, 2_870_208, 5_717_416)
register_pe('vit_pe_small_patch16_224', 'vit_small_patch16_224', 11_433_832, 11_048_832, 22_050_664)
register_pe('vit_pe_base_patch16_224', 'vit_base_patch16_224', 44_100_328, 43_331_328, 86_567_656)
register_pe('vit_pe_nano_patch4_32', 'vit_nano_patch4_32', 616_074, 614_784, 1_205_898)
register_pe('vit_pe_tiny_patch4_32', 'vit_tiny_patch4_32', 2_708_554, 2_706_624, 5_362_762)
register_pe('vit_pe_small_patch4_32', 'vit_small_patch4_32', 10_725_514, 10_721_664, 21_342_346)
register_pe('vit_pe_micro_patch4_16', 'vit_micro_patch4_16', 233_770, 232_800, 454_954)


@register_model
def vit_pe_tiny_patch16_224(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT-PE-Ti/16: twin of timm ``vit_tiny_patch16_224``."""
    return _create_vit('vit_pe_tiny_patch16_224', pretrained, **{**_TINY, 'patch_size': 16, **kwargs})


@register_model
def vit_pe_small_patch16_224(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT-PE-S/16: twin of timm ``vit_small_patch16_224``."""
    return _create_vit('vit_pe_small_patch16_224', pretrained, **{**_SMALL, 'patch_size': 16, **kwargs})


@register_model
def vit_pe_base_patch16_224(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT-PE-B/16: twin of timm ``vit_base_patch16_224``."""
    return _create_vit('vit_pe_base_patch16_224', pretrained, **{**_BASE, 'patch_size': 16, **kwargs})


@register_model
def vit_nano_patch4_32(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """Dense ViT (dim 128, depth 6, 4 heads) with 4-px patches for 32-px images; the CPU-sized one."""
    return _create_vit('vit_nano_patch4_32', pretrained, pe=False, **{**_NANO, **_P4_32, **kwargs})


@register_model
def vit_pe_nano_patch4_32(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT-PE nano with 4-px patches for 32-px images: twin of ``vit_nano_patch4_32``."""
    return _create_vit('vit_pe_nano_patch4_32', pretrained, **{**_NANO, **_P4_32, **kwargs})


@register_model
def vit_tiny_patch4_32(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """Dense ViT-Ti with 4-px patches for 32-px images (CIFAR): 64 tokens + class token."""
    return _create_vit('vit_tiny_patch4_32', pretrained, pe=False, **{**_TINY, **_P4_32, **kwargs})


@register_model
def vit_pe_tiny_patch4_32(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT-PE-Ti with 4-px patches for 32-px images: twin of ``vit_tiny_patch4_32``."""
    return _create_vit('vit_pe_tiny_patch4_32', pretrained, **{**_TINY, **_P4_32, **kwargs})


@register_model
def vit_small_patch4_32(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """Dense ViT-S with 4-px patches for 32-px images."""
    return _create_vit('vit_small_patch4_32', pretrained, pe=False, **{**_SMALL, **_P4_32, **kwargs})


@register_model
def vit_pe_small_patch4_32(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT-PE-S with 4-px patches for 32-px images: twin of ``vit_small_patch4_32``."""
    return _create_vit('vit_pe_small_patch4_32', pretrained, **{**_SMALL, **_P4_32, **kwargs})


@register_model
def vit_micro_patch4_16(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """Dense demo ViT (dim 96, depth 4) for 16-px images such as upsampled 8×8 digits."""
    return _create_vit('vit_micro_patch4_16', pretrained, pe=False, **{**_MICRO, **kwargs})


@register_model
def vit_pe_micro_patch4_16(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """PE demo ViT: twin of ``vit_micro_patch4_16``."""
    return _create_vit('vit_pe_micro_patch4_16', pretrained, **{**_MICRO, **kwargs})
