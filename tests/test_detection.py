"""PE models as the backbone of torchvision's Faster R-CNN: forward and backward on a random batch."""
import pytest
import torch
from torchvision.models.detection import FasterRCNN

from rowcol.detection import fpn_backbone
from rowcol.halve import halve
from rowcol.models import create_model


def _targets(n: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        xy = torch.rand(3, 2, generator=g) * 100
        out.append(dict(boxes=torch.cat([xy, xy + 20 + torch.rand(3, 2, generator=g) * 40], 1),
                        labels=torch.randint(1, 5, (3,), generator=g)))
    return out


@pytest.mark.slow
@pytest.mark.parametrize('name, kwargs', [('resnet50_pe', {}), ('vit_pe_small_patch16_224', {'dynamic_img_size': True})])
def test_faster_rcnn_trains_and_detects_with_a_pe_backbone(name, kwargs):
    torch.manual_seed(0)
    model = create_model(name, num_classes=0, **kwargs)
    with torch.no_grad():  # timm zero-inits each block's last BN, which would starve W of gradient
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.add_(0.1)
    backbone = fpn_backbone(model)
    det = FasterRCNN(backbone, num_classes=5, min_size=160, max_size=192)
    images = [torch.rand(3, 160, 176), torch.rand(3, 144, 192)]
    losses = det(images, _targets(2))
    assert set(losses) >= {'loss_classifier', 'loss_box_reg', 'loss_objectness', 'loss_rpn_box_reg'}
    sum(losses.values()).backward()
    tied = [p for n, p in backbone.named_parameters() if n.endswith(('.w.weight', 'q.weight', 'kv.weight', 'fc.weight'))]
    assert tied and all(p.grad is not None and p.grad.abs().sum() > 0 for p in tied)
    det.eval()
    with torch.no_grad():
        out = det(images)
    assert len(out) == 2 and out[0]['boxes'].shape[-1] == 4


def test_fpn_backbone_of_a_halved_timm_resnet_and_bad_models():
    torch.manual_seed(0)
    backbone = fpn_backbone(halve(create_model('resnet26', num_classes=0)))
    feats = backbone(torch.rand(1, 3, 64, 64))
    assert list(feats) == ['0', '1', '2', '3', 'pool'] and all(f.shape[1] == 256 for f in feats.values())
    assert [f.shape[-1] for f in feats.values()] == [16, 8, 4, 2, 1]
    with pytest.raises(ValueError, match='dynamic_img_size=True'):
        fpn_backbone(create_model('vit_pe_micro_patch4_16'))
    with pytest.raises(ValueError, match='neither ViT blocks nor layer1-layer4'):
        fpn_backbone(create_model('convnext_atto'))
