"""rowcol.halve on timm's families: exact counts, the tie's gradient, dense init, files with each W once."""
from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_model, save_model
from timm.layers import GluMlp
from timm.models.resnet import Bottleneck
from timm.utils import ModelEmaV3

import rowcol  # noqa: F401  (registers the PE models)
from rowcol.apps.export import check_onnx, export_onnx_bytes
from rowcol.halve import NothingToHalveError, halve
from rowcol.layers import ATTN_FORMS, PeAttention, PeMlp, TiedLinear, TiedQKV, TiedT
from rowcol.stats import count_params

# Small members of each family (random weights, no downloads) and the input size they take.
FAMILIES = {
    'vit_tiny_patch16_224': (dict(img_size=32, patch_size=8, depth=2), 32),
    'deit_tiny_patch16_224': (dict(img_size=32, patch_size=8, depth=2), 32),
    'pvt_v2_b0': (dict(depths=(1, 1, 1, 1)), 64),
    'swin_tiny_patch4_window7_224': (dict(img_size=56, depths=(1, 1, 1, 1), embed_dim=24, num_heads=(1, 2, 2, 4)), 56),
    'convnext_atto': (dict(depths=(1, 1, 1, 1)), 64),
    'mixer_s16_224': (dict(img_size=32), 32),
    'resnet26': (dict(), 32),
    'resnet50': (dict(), 32),
}


pytestmark = pytest.mark.usefixtures('one_thread')


def _dense(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    kw, _ = FAMILIES[name]
    return timm.create_model(name, num_classes=10, **kw).eval()


def _input(name: str, batch: int = 2) -> torch.Tensor:
    size = FAMILIES[name][1]
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


def _mat(layer) -> torch.Tensor:
    return layer.weight[:, :, 0, 0] if layer.weight.dim() == 4 else layer.weight


def _is_attention_with_qkv(m: nn.Module) -> bool:
    return isinstance(getattr(m, 'qkv', None), nn.Linear) and isinstance(getattr(m, 'proj', None), nn.Linear)


def _is_pvt_attention(m: nn.Module) -> bool:
    return all(isinstance(getattr(m, a, None), nn.Linear) for a in ('q', 'kv', 'proj'))


def _saving(model: nn.Module, attn: str = 'qo_kv') -> int:
    """Parameters a halved ``model`` must lose, counted from the dense model's layers alone."""
    saved = 0
    for m in model.modules():
        if isinstance(getattr(m, 'fc1', None), (nn.Linear, nn.Conv2d)) and hasattr(m, 'fc2'):
            saved += m.fc2.weight.numel()  # W2 goes, W1 stays as W
        elif isinstance(m, Bottleneck) and m.downsample is None:
            saved += m.conv3.weight.numel()
        elif _is_attention_with_qkv(m) or _is_pvt_attention(m):
            d = m.proj.weight.shape[0]
            saved += {'qo_kv': 2, 'qk_vo': 2, 'vo': 1}[attn] * d * d  # of four d×d matrices, 2, 2 or 3 stay
    return saved


@torch.no_grad()
def _symmetric(model: nn.Module) -> nn.Module:
    """Perturb every weight, then make each pair satisfy W2 = W1ᵀ (for attention: W_out = W_qᵀ, W_v = W_kᵀ)."""
    for n, p in model.named_parameters():
        p.add_(torch.randn_like(p) * 0.05)
        if n.endswith(('bn3.weight', 'bn2.weight', 'bn1.weight')):
            p.uniform_(0.5, 1.5)  # timm zero-inits the last BN of a bottleneck: give conv3 a gradient
    for m in model.modules():
        if isinstance(getattr(m, 'fc1', None), (nn.Linear, nn.Conv2d)) and hasattr(m, 'fc2'):
            m.fc2.weight.copy_(_mat(m.fc1).t().reshape(m.fc2.weight.shape))
        elif isinstance(m, Bottleneck) and m.downsample is None:
            m.conv3.weight.copy_(_mat(m.conv1).t().reshape(m.conv3.weight.shape))
        elif _is_attention_with_qkv(m):
            d = m.proj.weight.shape[0]
            w = m.qkv.weight
            m.proj.weight.copy_(w[:d].t())
            w[2 * d:].copy_(w[d:2 * d].t())
        elif _is_pvt_attention(m):
            d = m.proj.weight.shape[0]
            m.proj.weight.copy_(m.q.weight.t())
            m.kv.weight[d:].copy_(m.kv.weight[:d].t())
    return model


def _grad_pairs(dense: nn.Module, halved: nn.Module, row: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(the tied W's gradient, the sum of the dense pair's gradients as W1 + W2ᵀ) for one report row."""
    name = row['name']
    if row['kind'] in ('Mlp', 'MlpWithDepthwiseConv', 'GlobalResponseNormMlp', 'ConvMlp', 'Bottleneck'):
        d, h = dense.get_submodule(name), halved.get_submodule(name)
        w = h.fc.weight if isinstance(h, PeMlp) else (h.conv1 if row['kind'] == 'Bottleneck' else h.fc1).weight
        l1, l2 = (d.conv1, d.conv3) if row['kind'] == 'Bottleneck' else (d.fc1, d.fc2)
        return w.grad, _grad(l1) + _grad(l2).t()
    parent, _, part = name.rpartition('.')
    d, h = dense.get_submodule(parent), halved.get_submodule(parent)
    tied = h.qkv if isinstance(getattr(h, 'qkv', None), TiedQKV) else h
    if _is_pvt_attention(d):
        dim = d.proj.weight.shape[0]
        if part == 'q':
            return h.q.weight.grad, d.q.weight.grad + d.proj.weight.grad.t()
        g = d.kv.weight.grad
        return h.kv.kv.weight.grad, g[:dim] + g[dim:].t()
    dim = d.proj.weight.shape[0]
    g = d.qkv.weight.grad
    if part == 'q':
        return tied.q.weight.grad, g[:dim] + d.proj.weight.grad.t()
    return tied.kv.weight.grad, g[dim:2 * dim] + g[2 * dim:].t()


def _grad(layer) -> torch.Tensor:
    return layer.weight.grad[:, :, 0, 0] if layer.weight.dim() == 4 else layer.weight.grad


@pytest.mark.parametrize('name', list(FAMILIES))
def test_params_exact_and_every_mlp_tied(name):
    dense = _dense(name)
    expected = count_params(dense) - _saving(dense)
    halved = halve(copy.deepcopy(dense))
    assert count_params(halved) == expected
    assert halved.halve_report.params_after == expected
    left = [r for r in halved.halve_report.dense if r['kind'] != 'Bottleneck']
    assert left == [], f'{name}: pairs left dense: {left}'
    out = halved(_input(name))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


@pytest.mark.parametrize('name', list(FAMILIES))
def test_dense_init_reproduces_symmetric_dense_and_grad_is_sum_of_uses(name):
    dense = _symmetric(_dense(name).double())
    halved = halve(copy.deepcopy(dense), init='dense')
    x = _input(name).double()
    y_dense, y_halved = dense(x), halved(x)
    torch.testing.assert_close(y_halved, y_dense, rtol=1e-9, atol=1e-9)
    assert all(r['rel_error'] < 1e-12 for r in halved.halve_report.tied)
    y_dense.square().sum().backward()
    y_halved.square().sum().backward()
    for row in halved.halve_report.tied:
        got, want = _grad_pairs(dense, halved, row)
        torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-10, msg=lambda m: f"{row['name']}: {m}")


def test_dense_init_is_the_least_squares_mean_and_reports_the_error():
    dense = _dense('vit_tiny_patch16_224')
    halved = halve(copy.deepcopy(dense), init='dense')
    w1, w2 = dense.blocks[0].mlp.fc1.weight, dense.blocks[0].mlp.fc2.weight
    w = halved.blocks[0].mlp.fc.weight
    torch.testing.assert_close(w, (w1 + w2.t()) / 2)
    torch.testing.assert_close(halved.blocks[0].mlp.fc.bias, dense.blocks[0].mlp.fc1.bias)
    torch.testing.assert_close(halved.blocks[0].mlp.fc.bias_t, dense.blocks[0].mlp.fc2.bias)
    row = next(r for r in halved.halve_report.tied if r['name'] == 'blocks.0.mlp')
    assert row['rel_error'] == pytest.approx(((w1 - w).norm() / w1.norm()).item())
    assert 0.5 < row['rel_error'] < 1  # two independent random matrices: ‖W1 − W2ᵀ‖ / 2‖W1‖ ≈ 1/√2


@pytest.mark.parametrize('name', list(FAMILIES))
def test_safetensors_round_trip_stores_each_w_once(name, tmp_path):
    halved = halve(_dense(name, seed=0))
    path = tmp_path / 'm.safetensors'
    save_model(halved, str(path))
    with safe_open(str(path), 'pt') as f:
        stored = {k: f.get_tensor(k) for k in f.keys()}
    assert set(stored) == set(halved.state_dict())
    assert sum(t.numel() for k, t in stored.items() if k in dict(halved.named_parameters())) == count_params(halved)
    tied = [m.weight for _, m in halved.named_modules() if isinstance(m, TiedLinear)]
    assert tied
    for w in tied:  # each tied W once, neither as W nor as Wᵀ anywhere else
        copies = [k for k, t in stored.items() if t.shape in (w.shape, w.t().shape)
                  and (torch.equal(t, w.detach()) or torch.equal(t, w.detach().t()))]
        assert len(copies) == 1, copies
    other = halve(_dense(name, seed=1))
    load_model(other, str(path), strict=True)
    x = _input(name)
    torch.testing.assert_close(other(x), halved(x))


@pytest.mark.slow
@pytest.mark.parametrize('name', [n for n in FAMILIES if n != 'resnet50'])  # resnet50 has resnet26's blocks
def test_onnx_stores_each_w_once(name):
    halved = halve(_dense(name))
    data = export_onnx_bytes(halved, img_size=FAMILIES[name][1])
    check_onnx(data, halved)  # raises if a tied W is stored twice (as W or Wᵀ) or the file is too big


def test_halved_vit_small_is_vit_pe_small():
    torch.manual_seed(0)
    halved = halve(timm.create_model('vit_small_patch16_224'))
    assert count_params(halved) == 11_433_832 == rowcol.pe_spec('vit_pe_small_patch16_224').params
    pe = timm.create_model('vit_pe_small_patch16_224')
    pe.load_state_dict(halved.state_dict(), strict=True)
    x = torch.randn(1, 3, 224, 224)
    torch.testing.assert_close(pe.eval()(x), halved.eval()(x), rtol=0, atol=0)


@pytest.mark.parametrize('form', ATTN_FORMS)
def test_attention_forms_count_and_run(form):
    for name in ('vit_tiny_patch16_224', 'swin_tiny_patch4_window7_224'):
        dense = _dense(name)
        halved = halve(copy.deepcopy(dense), attn=form)
        assert count_params(halved) == count_params(dense) - _saving(dense, form)
        halved(_input(name)).sum().backward()
        assert all(p.grad is not None for p in halved.parameters() if p.requires_grad)


def test_pvt_keeps_attention_dense_for_other_forms_and_says_why():
    halved = halve(_dense('pvt_v2_b0'), attn='vo')
    reasons = {r['reason'] for r in halved.halve_report.dense}
    assert len(halved.halve_report.dense) == 4 and all('qo_kv' in r for r in reasons)


def test_attn_none_keeps_attention_dense():
    dense = _dense('vit_tiny_patch16_224')
    halved = halve(copy.deepcopy(dense), attn=None)
    mlp_saving = sum(b.mlp.fc2.weight.numel() for b in dense.blocks)
    assert count_params(halved) == count_params(dense) - mlp_saving
    assert type(halved.blocks[0].attn) is timm.layers.Attention
    assert halve(copy.deepcopy(dense), attn='dense').halve_report.params_after == count_params(halved)


def test_gated_mlp_and_qk_norm_left_dense_with_reasons():
    torch.manual_seed(0)
    model = timm.create_model('vit_tiny_patch16_224', img_size=32, patch_size=8, depth=2, mlp_layer=GluMlp,
                              qk_norm=True, num_classes=10)
    with pytest.raises(NothingToHalveError, match='nothing to halve'):
        halve(model)
    model = timm.create_model('vit_tiny_patch16_224', img_size=32, patch_size=8, depth=2, mlp_layer=GluMlp,
                              num_classes=10)
    halved = halve(model)
    kinds = {r['kind']: r['reason'] for r in halved.halve_report.dense}
    assert 'gated' in kinds['GluMlp']
    assert all(isinstance(b.attn, PeAttention) for b in halved.blocks)
    assert 'GluMlp' in str(halved.halve_report)


def test_nothing_to_halve_names_the_model():
    with pytest.raises(NothingToHalveError, match='resnet18: nothing to halve'):
        halve(timm.create_model('resnet18', num_classes=10))


def test_bad_arguments():
    model = _dense('vit_tiny_patch16_224')
    with pytest.raises(ValueError, match='unknown attn'):
        halve(model, attn='qkvo')
    with pytest.raises(ValueError, match='unknown init'):
        halve(model, init='svd')


def test_use_scale_starts_as_identity_and_costs_under_2_percent():
    dense = _symmetric(_dense('vit_tiny_patch16_224').double())
    halved = halve(copy.deepcopy(dense), init='dense', use_scale=True)
    x = _input('vit_tiny_patch16_224').double()
    torch.testing.assert_close(halved(x), dense(x), rtol=1e-9, atol=1e-9)
    dim, hidden, depth = 192, 768, 2
    plain = count_params(dense) - _saving(dense)
    assert count_params(halved) == plain + depth * (2 * hidden + dim + 4 * dim)
    assert count_params(halved) / plain - 1 < 0.02
    scaled = timm.create_model('vit_pe_nano_patch4_32', use_scale=True, num_classes=10)
    assert count_params(scaled) - rowcol.pe_spec('vit_pe_nano_patch4_32').params == 6 * (2 * 512 + 128 + 4 * 128)
    with pytest.raises(ValueError, match='use_scale apply to PE models only'):
        timm.create_model('vit_nano_patch4_32', use_scale=True)


def test_copies_and_ema_keep_the_tie_inside_the_copy():
    halved = halve(_dense('pvt_v2_b0'))
    twin = copy.deepcopy(halved)
    mlp, mlp2 = halved.stages[0].blocks[0].mlp, twin.stages[0].blocks[0].mlp
    assert mlp2.fc2.src is mlp2.fc1 and mlp2.fc2.src is not mlp.fc1
    ema = ModelEmaV3(halved, decay=0.5)
    with torch.no_grad():
        for p in halved.parameters():
            p.add_(1.0)
    ema.update(halved, step=10)  # decay 0.5: each parameter moves half-way, once
    e = ema.module.stages[0].blocks[0].mlp
    assert e.fc2.src is e.fc1
    torch.testing.assert_close(e.fc1.weight, mlp.fc1.weight - 0.5)
    assert len(list(ema.module.parameters())) == len(list(halved.parameters()))


def test_halve_in_place_returns_the_model_and_to_keeps_the_tie():
    model = _dense('resnet26')
    assert halve(model) is model
    model.to(torch.float64)
    blk = model.layer1[1]
    assert isinstance(blk.conv1, TiedLinear) and blk.conv3.src is blk.conv1
    assert blk.conv1.weight.dtype == torch.float64
    model(_input('resnet26').double()).sum().backward()
    assert blk.conv1.weight.grad is not None


@pytest.mark.parametrize('name', ['vit_tiny_patch16_224', 'pvt_v2_b0', 'swin_tiny_patch4_window7_224', 'resnet26'])
def test_torch_compile_captures_the_tie_in_one_graph(name):
    halved = halve(_dense(name)).train()
    x = _input(name)
    compiled = torch.compile(halved, backend='aot_eager', fullgraph=True)  # dynamo capture, no graph break
    torch.manual_seed(0)
    compiled(x).square().sum().backward()
    grads = {n: p.grad.clone() for n, p in halved.named_parameters()}
    halved.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    halved(x).square().sum().backward()
    for n, p in halved.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize('name', ['vit_tiny_patch16_224', 'pvt_v2_b0', 'swin_tiny_patch4_window7_224', 'convnext_atto',
                                  'mixer_s16_224', 'resnet26'])
def test_fx_trace_equals_eager(name):
    from torch.fx import symbolic_trace
    halved = halve(_dense(name))
    x = _input(name)
    torch.testing.assert_close(symbolic_trace(halved)(x), halved(x), rtol=0, atol=0)


@pytest.mark.parametrize('kwargs', [{}, {'use_scale': True}, {'attn_form': 'qk_vo'}, {'attn_form': 'vo'}])
def test_pe_vit_fx_trace_equals_eager(kwargs):
    from torch.fx import symbolic_trace
    model = timm.create_model('vit_pe_micro_patch4_16', **kwargs).eval()
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(symbolic_trace(model)(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize('name', ['vit_tiny_patch16_224', 'pvt_v2_b0', 'resnet26'])
def test_halved_models_export_and_build_on_meta(name):
    halved = halve(_dense(name))
    x = _input(name)
    with torch.no_grad():
        torch.testing.assert_close(torch.export.export(halved, (x,)).module()(x), halved(x), rtol=1e-5, atol=1e-6)
    kw, _ = FAMILIES[name]
    with torch.device('meta'):
        meta = halve(timm.create_model(name, num_classes=10, **kw))
    assert all(p.device.type == 'meta' for p in meta.parameters())
    assert count_params(meta) == count_params(halved)


def test_scratch_init_of_untied_projections_matches_the_tied_ones():
    halved = halve(_dense('swin_tiny_patch4_window7_224'), attn='vo')
    qkv = halved.layers[0].blocks[0].attn.qkv
    for lin in (qkv.q, qkv.k, qkv.vo):
        assert lin.weight.std().item() == pytest.approx(0.02, rel=0.25) and not lin.bias.any()
