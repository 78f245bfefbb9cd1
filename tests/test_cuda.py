"""The PE models on a CUDA device: the same numbers as the CPU, and bf16 autocast training steps.

Skipped where no CUDA device is present (CI has none); run them on a GPU with
``python -m pytest tests/test_cuda.py``. The CPU tests cover the math; these cover the code paths
that only CUDA takes (cuDNN convolutions and GEMMs on channels_last, CUDA autocast, which has no
fp32 fallback of the stage-entry depthwise conv) and the device moves of tied weights.
"""
import copy

import pytest
import timm
import torch
import torch.nn as nn

from rowcol.layers import tied_modules
from rowcol.models import create_model, pe_models

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')


def _model_and_input(name, batch=4):
    """A PE model (7 classes) and an input at a small resolution, every BN's affine perturbed so that
    the zero-initialised last BNs do not hide a wrong gradient of W."""
    kwargs = {'num_classes': 7}
    size = timm.get_pretrained_cfg(name).input_size[-1]
    if 'patch16' in name:
        size = kwargs['img_size'] = 32
    elif 'resnet50' in name:
        size = 64
    model = create_model(name, **kwargs)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.add_(0.1)
    return model, torch.randn(batch, 3, size, size)


def _step(model, x):
    model.train()
    out = model(x)
    (out if out.dtype == torch.float64 else out.float()).logsumexp(-1).sum().backward()
    return out


@pytest.mark.parametrize('channels_last', [False, True])
@pytest.mark.parametrize('name', pe_models())
def test_cuda_training_step_equals_the_cpu_in_float64(name, channels_last):
    """Outputs, every gradient (a tied W's is the sum over its uses) and the BN running statistics of
    a training step agree between CPU and CUDA in float64, and the tie survives the move."""
    cpu, x = _model_and_input(name)
    cpu = cpu.double()
    gpu = copy.deepcopy(cpu).cuda()
    x = x.double()
    xg = x.cuda()
    if channels_last:
        cpu, gpu = cpu.to(memory_format=torch.channels_last), gpu.to(memory_format=torch.channels_last)
        x, xg = x.to(memory_format=torch.channels_last), xg.to(memory_format=torch.channels_last)
    out_c, out_g = _step(cpu, x), _step(gpu, xg)
    torch.testing.assert_close(out_g.cpu(), out_c, rtol=1e-7, atol=1e-9)
    for (n, pc), pg in zip(cpu.named_parameters(), gpu.parameters()):
        torch.testing.assert_close(pg.grad.cpu(), pc.grad, rtol=1e-6, atol=1e-9, msg=lambda m, n=n: f'{n}: {m}')
    for (n, bc), bg in zip(cpu.named_buffers(), gpu.buffers()):
        torch.testing.assert_close(bg.cpu(), bc, rtol=1e-7, atol=1e-9, msg=lambda m, n=n: f'{n}: {m}')
    assert [n for n, _ in gpu.named_parameters()] == [n for n, _ in cpu.named_parameters()]  # shared stay shared
    for n, m in tied_modules(gpu):
        assert m.weight.is_cuda and m.weight.grad is not None, n


@pytest.mark.parametrize('name', pe_models())
def test_cuda_bf16_autocast_training_step(name):
    """Under CUDA bf16 autocast a training step runs, stays close to fp32 and gives finite gradients
    to every parameter; the tied W stays one fp32 parameter."""
    model, x = _model_and_input(name, batch=8)
    model, x = model.cuda().to(memory_format=torch.channels_last), x.cuda().to(memory_format=torch.channels_last)
    ref_model = copy.deepcopy(model)
    with torch.autocast('cuda', dtype=torch.bfloat16):
        low = _step(model, x).float()
    assert low.dtype == torch.float32 and torch.isfinite(low).all()
    ref = _step(ref_model, x)
    assert (low - ref).abs().max() < 0.1 * ref.abs().max() + 0.05
    bad = [n for n, p in model.named_parameters()
           if p.dtype != torch.float32 or p.grad is None or not torch.isfinite(p.grad).all()]
    assert not bad, f'parameters without a finite fp32 gradient: {bad[:5]}'
