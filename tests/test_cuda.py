"""The PE models on a CUDA device: the same numbers as the CPU, and bf16 autocast training steps.

Skipped where no CUDA device is present (CI has none); run them on a GPU with
``python -m pytest tests/test_cuda.py``. The CPU tests cover the math; these cover the code paths
that only CUDA takes (cuDNN convolutions and GEMMs on channels_last, CUDA autocast, which has no
fp32 fallback of the stage-entry depthwise conv) and the device moves of tied weights.
"""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from rowcol.layers import tied_modules
from rowcol.models import pe_models
from test_models import _small  # the registry's models at their test sizes

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')


def _model_and_input(name, batch=4):
    """A PE model (7 classes) and an input at its test size, every BN's affine perturbed so that the
    zero-initialised last BNs do not hide a wrong gradient of W."""
    model, x = _small(name)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.add_(0.1)
    return model, torch.randn(batch, *x.shape[1:])


def _step(model, x, amp=False):
    model.train()
    with torch.autocast('cuda', dtype=torch.bfloat16, enabled=amp):
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
    """Under CUDA bf16 autocast a channels_last training step runs, stays close to fp32, keeps every
    image tensor channels_last (float64 above runs NCHW in cuDNN, so this is where rowcol's
    channels_last paths run on CUDA), and gives every parameter a finite fp32 gradient, each tied W's
    pointing where fp32's does."""
    model, x = _model_and_input(name, batch=8)
    model, x = model.cuda().to(memory_format=torch.channels_last), x.cuda().to(memory_format=torch.channels_last)
    ref_model = copy.deepcopy(model)
    not_cl = []

    def check(mod, args, out, n):
        if isinstance(out, torch.Tensor) and out.dim() == 4 and not out.is_contiguous(memory_format=torch.channels_last):
            not_cl.append(n)
    hooks = [m.register_forward_hook(lambda mod, a, o, n=n: check(mod, a, o, n)) for n, m in model.named_modules()]
    low = _step(model, x, amp=True).float()
    for h in hooks:
        h.remove()
    assert not not_cl, f'4-D outputs not channels_last: {not_cl[:5]}'
    assert torch.isfinite(low).all()
    ref = _step(ref_model, x)
    assert (low - ref).abs().max() < 0.1 * ref.abs().max() + 0.05
    bad = [n for n, p in model.named_parameters()
           if p.dtype != torch.float32 or p.grad is None or not torch.isfinite(p.grad).all()]
    assert not bad, f'parameters without a finite fp32 gradient: {bad[:5]}'
    refs = dict(ref_model.named_parameters())
    for n, m in tied_modules(model):
        cos = F.cosine_similarity(m.weight.grad.flatten(), refs[f'{n}.weight'].grad.flatten(), dim=0)
        # CPU bf16, batch 8: 0.94-0.98 for the ResNet stage W's, 1.00 for the ViTs'; a gradient
        # that lost one of W's two uses would be far lower
        assert cos > 0.85, f'{n}: the bf16 gradient of W is off (cosine {cos:.3f} to fp32)'
