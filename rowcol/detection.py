"""rowcol models as backbones of torchvision's detectors (Faster R-CNN, Mask R-CNN), through an FPN.

The authors report COCO detection for their PE models this way (HaLViT). :func:`fpn_backbone`
returns a module with ``out_channels`` that maps images (B, 3, H, W) to an ordered dict of
feature maps, which is what ``torchvision.models.detection.FasterRCNN(backbone, ...)`` takes:

* a CNN (``resnet50_pe``, a halved timm ResNet, ...): the outputs of ``layer1``-``layer4``
  (strides 4-32), taken with torchvision's FX feature extractor;
* a ViT (``vit_pe_small_patch16_224``, built with ``dynamic_img_size=True`` so that any image
  size works): the last block's patch tokens as one map at the patch stride, made a pyramid of
  strides p/4, p/2, p, 2p by resizing (ViTDet's simple pyramid, without its learned layers).

Both then go through torchvision's ``FeaturePyramidNetwork`` (plus its extra max-pool level).
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['fpn_backbone', 'FpnBackbone']


class FpnBackbone(nn.Module):
    """Feature maps of ``body`` (an ordered dict of (B, C_i, H_i, W_i)) through an FPN."""

    def __init__(self, body: nn.Module, in_channels: list[int], out_channels: int = 256) -> None:
        super().__init__()
        from torchvision.ops import FeaturePyramidNetwork
        from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
        self.body = body
        self.fpn = FeaturePyramidNetwork(in_channels, out_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return self.fpn(self.body(x))


class _VitPyramid(nn.Module):
    """A ViT's last tokens as a map at the patch stride, resized to four strides."""

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.vit = vit

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        p = self.vit.patch_embed.patch_size
        h, w = x.shape[-2] // p[0], x.shape[-1] // p[1]
        tokens = self.vit.forward_features(x)[:, self.vit.num_prefix_tokens:]  # (B, h*w, C)
        fmap = tokens.transpose(1, 2).reshape(x.shape[0], -1, h, w)  # (B, C, h, w)
        return OrderedDict([
            ('0', F.interpolate(fmap, scale_factor=4., mode='bilinear', align_corners=False)),
            ('1', F.interpolate(fmap, scale_factor=2., mode='bilinear', align_corners=False)),
            ('2', fmap),
            ('3', F.max_pool2d(fmap, 2)),
        ])


def fpn_backbone(model: nn.Module, out_channels: int = 256) -> FpnBackbone:
    """``model`` (a rowcol or halved timm model) as an FPN backbone for torchvision's detectors."""
    if hasattr(model, 'patch_embed') and hasattr(model, 'blocks'):
        if not getattr(model, 'dynamic_img_size', False):
            raise ValueError('fpn_backbone: build the ViT with dynamic_img_size=True; detectors resize images')
        return FpnBackbone(_VitPyramid(model), [model.embed_dim] * 4, out_channels)
    layers = [f'layer{i}' for i in range(1, 5)]
    if not all(hasattr(model, n) for n in layers):
        raise ValueError(f'fpn_backbone: {type(model).__name__} has neither ViT blocks nor layer1-layer4')
    from torchvision.models.feature_extraction import create_feature_extractor
    channels = {f['module']: f['num_chs'] for f in getattr(model, 'feature_info', [])}  # timm's, per stage
    body = create_feature_extractor(model, return_nodes={n: str(i) for i, n in enumerate(layers)})
    return FpnBackbone(body, [channels[n] for n in layers], out_channels)
