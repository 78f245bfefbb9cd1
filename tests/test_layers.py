"""The tie itself: one Parameter serves W and Wᵀ, checked against hand-written formulas."""
from math import prod

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Attention
from torch.utils._python_dispatch import TorchDispatchMode

from rowcol.layers import ATTN_FORMS, PeAttention, PeMlp, TiedLinear, pe_attention


def _rand_(module):
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.3)
    return module


def test_pe_mlp_is_wt_f_wx_plus_b():
    mlp = _rand_(PeMlp(6, 10))
    x = torch.randn(2, 3, 6)
    W, b1, b2 = mlp.fc.weight, mlp.fc.bias, mlp.fc.bias_t
    expected = F.gelu(x @ W.T + b1) @ W + b2  # Wᵀ F(W x + b1) + b2 on row vectors
    torch.testing.assert_close(mlp(x), expected)
    assert [n for n, _ in mlp.named_parameters()] == ['fc.weight', 'fc.bias', 'fc.bias_t']
    assert not hasattr(mlp, 'fc2')


def test_tied_gradient_is_sum_of_both_uses_by_hand():
    """dL/dW for y = Wᵀ tanh(W x + b1) + b2 computed by hand: both uses add up."""
    lin = _rand_(TiedLinear(5, 7))
    x, g = torch.randn(4, 5), torch.randn(4, 5)
    W = lin.weight
    y = lin.forward_t(torch.tanh(lin(x)))
    (y * g).sum().backward()
    with torch.no_grad():
        z = x @ W.T + lin.bias          # (4, 7)
        h = torch.tanh(z)
        grad_second = h.T @ g           # from y = h W: dL/dW = hᵀ g, (7, 5)
        dz = (g @ W.T) * (1 - h ** 2)   # back through Wᵀ and tanh
        grad_first = dz.T @ x           # from z = x Wᵀ: dL/dW = dzᵀ x, (7, 5)
    torch.testing.assert_close(W.grad, grad_first + grad_second)
    assert grad_first.abs().sum() > 0 and grad_second.abs().sum() > 0
    torch.testing.assert_close(lin.bias_t.grad, g.sum(0))


def test_perturbing_w_changes_both_maps():
    lin = _rand_(TiedLinear(4, 6))
    x, h = torch.randn(3, 4), torch.randn(3, 6)
    before = lin(x), lin.forward_t(h)
    with torch.no_grad():
        lin.weight[2, 1] += 1.0
    after = lin(x), lin.forward_t(h)
    torch.testing.assert_close(after[0] - before[0], x[:, 1:2] * torch.eye(6)[2])  # column 2 of W x moved
    torch.testing.assert_close(after[1] - before[1], h[:, 2:3] * torch.eye(4)[1])  # row 1 of Wᵀ h moved


def test_conv_maps_equal_linear_maps():
    lin = _rand_(TiedLinear(8, 3, bias=False, bias_t=False))
    x = torch.randn(2, 8, 5, 5)
    up = lin.conv(x)
    torch.testing.assert_close(up, lin(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))
    down = lin.conv_t(up)
    torch.testing.assert_close(down, lin.forward_t(up.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))
    cl = lin.conv_t(up.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(cl, down)


def _attn_reference(attn, x):
    B, N, C = x.shape
    H, D = attn.num_heads, attn.head_dim
    Wq, Wkv = attn.q.weight, attn.kv.weight
    q = x @ Wq.T + attn.q.bias         # Q = W_q x
    k = x @ Wkv.T + attn.kv.bias       # K = W_kv x
    v = x @ Wkv + attn.kv.bias_t       # V = W_kvᵀ x
    split = lambda t: t.view(B, N, H, D).transpose(1, 2)
    a = (split(q) @ split(k).transpose(-2, -1) / D ** 0.5).softmax(-1)
    o = (a @ split(v)).transpose(1, 2).reshape(B, N, C)
    return o @ Wq + attn.q.bias_t      # out = W_qᵀ o


def test_pe_attention_is_the_authors_form():
    attn = _rand_(PeAttention(12, num_heads=3, qkv_bias=True))
    x = torch.randn(2, 5, 12)
    torch.testing.assert_close(attn(x), _attn_reference(attn, x), rtol=1e-5, atol=1e-5)
    n_params = sum(p.numel() for p in attn.parameters())
    assert n_params == 2 * 12 * 12 + 4 * 12  # two d×d matrices and the q, k, v, out biases
    attn.fused_attn = False
    torch.testing.assert_close(attn(x), _attn_reference(attn, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('form,mats', [('qo_kv', 2), ('qk_vo', 2), ('vo', 3)])
def test_attention_forms_count_and_grad(form, mats):
    attn = _rand_(pe_attention(form)(16, num_heads=4, qkv_bias=True))
    assert attn.form == form
    matrices = [p for p in attn.parameters() if p.ndim == 2]
    assert len(matrices) == mats
    attn(torch.randn(2, 3, 16)).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in attn.parameters())


class _InputCasts(TorchDispatchMode):
    """Counts float32 -> other-dtype copies of tensors of one shape (autocast's input casts)."""

    def __init__(self, shape):
        super().__init__()
        self.shape, self.n = tuple(shape), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._to_copy.default and args[0].dtype == torch.float32 \
                and kwargs.get('dtype') not in (None, torch.float32) and args[0].numel() == prod(self.shape):
            self.n += 1
        return func(*args, **kwargs)


@pytest.mark.parametrize('form', ['qo_kv', 'qk_vo', 'vo'])
def test_pe_attention_casts_its_input_once_under_autocast(form):
    """Three projections read x; under bf16 autocast x is cast once (as timm's fused qkv does), not
    once per projection, and the output matches the uncast formula to bf16 precision."""
    attn = _rand_(pe_attention(form)(16, num_heads=4, qkv_bias=True))
    x = torch.randn(2, 5, 16)
    dense = Attention(16, num_heads=4, qkv_bias=True)
    for m in (attn, dense):
        with torch.autocast('cpu', torch.bfloat16), _InputCasts(x.shape) as casts:
            y = m(x)
        assert y.dtype == torch.bfloat16 and casts.n == 1, (type(m).__name__, casts.n)
    with torch.autocast('cpu', torch.bfloat16):
        y = attn(x)
    torch.testing.assert_close(y.float(), attn(x), rtol=0.05, atol=0.05)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match='unknown attention form'):
        pe_attention('qkvo')
    with pytest.raises(ValueError, match='out_features'):
        PeMlp(8, 16, out_features=4)
    with pytest.raises(ValueError, match='divisible'):
        PeAttention(10, num_heads=3)
    assert set(ATTN_FORMS) == {'qo_kv', 'qk_vo', 'vo'}


def test_identity_activation_stays_in_row_space():
    """The break condition: with F = identity, Wᵀ W x lies in the row space of W."""
    mlp = _rand_(PeMlp(8, 3, act_layer=nn.Identity, bias=False))
    y = mlp(torch.randn(10, 8))  # rank(W) = 3, so y spans at most 3 dimensions
    assert torch.linalg.matrix_rank(y) == 3


def _grads(module, x):
    x = x.clone().requires_grad_(True)
    y = module(x)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters()}
    module.zero_grad()
    return y.detach(), x.grad, grads


@pytest.mark.parametrize('form', ATTN_FORMS)
@pytest.mark.parametrize('scaled', [False, True])
def test_fused_qkv_equals_one_gemm_per_projection(form, scaled):
    """Q, K, V in one GEMM over [W_q; W_kv; W_kvᵀ] (or the form's operands) give the outputs and
    gradients of three GEMMs, in fp32 to 1e-5; W's gradient still sums its two uses."""
    attn = _rand_(pe_attention(form, scaled)(16, num_heads=4, qkv_bias=True))
    x = torch.randn(2, 5, 16)
    assert attn.fused_qkv
    fused = _grads(attn, x)
    attn.fused_qkv = False
    each = _grads(attn, x)
    torch.testing.assert_close(fused[0], each[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused[1], each[1], rtol=1e-5, atol=1e-5)
    assert fused[2].keys() == each[2].keys()
    for name in fused[2]:
        torch.testing.assert_close(fused[2][name], each[2][name], rtol=1e-5, atol=1e-5, msg=name)
    if form == 'qo_kv' and not scaled:  # against the hand-written formula as well
        torch.testing.assert_close(fused[0], _attn_reference(attn, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('form,parts', [(f, 'qkv') for f in ATTN_FORMS] + [('qo_kv', 'kv')])
def test_fused_tied_qkv_equals_one_gemm_per_projection(form, parts):
    from rowcol.layers import TiedQKV
    qkv = _rand_(TiedQKV(12, form=form, parts=parts))
    x = torch.randn(3, 4, 12)
    fused = _grads(qkv, x)
    qkv.fused_qkv = False
    each = _grads(qkv, x)
    assert fused[0].shape == (3, 4, 12 * len(parts))
    for a, b in zip(fused[:2], each[:2]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for name in fused[2]:
        torch.testing.assert_close(fused[2][name], each[2][name], rtol=1e-5, atol=1e-5, msg=name)


def test_unimplemented_timm_arguments_are_refused():
    """timm's Mlp / Attention arguments that the PE layers do not implement raise, not pass silently."""
    for kwargs, match in [(dict(gated=True), 'gated'), (dict(attn_head_dim=8), 'attn_head_dim'),
                          (dict(dim_out=32), 'dim_out'), (dict(qk_norm=True), 'qk_norm')]:
        with pytest.raises(ValueError, match=match):
            PeAttention(16, num_heads=4, **kwargs)
    with pytest.raises(TypeError):
        PeAttention(16, num_heads=4, depth=3)  # DiffAttention's argument
    with pytest.raises(TypeError):
        PeMlp(8, 16, gate_last=True)
    with pytest.raises(ValueError, match='use_conv'):
        PeMlp(8, 16, use_conv=True)
    assert PeAttention(16, num_heads=4, attn_head_dim=4, dim_out=16).head_dim == 4  # the values it has


def test_pe_mlp_takes_timm_bias_and_drop_pairs():
    mlp = PeMlp(8, 16, bias=(True, False), drop=(0.1, 0.2))
    assert mlp.fc.bias is not None and mlp.fc.bias_t is None
    assert (mlp.drop1.p, mlp.drop2.p) == (0.1, 0.2)
    assert [n for n, _ in mlp.named_parameters()] == ['fc.weight', 'fc.bias']
