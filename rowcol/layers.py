"""The row/column-space tie, written once, and the PE blocks built on it.

Paper: "Do deep neural networks utilize the weight space efficiently?" (arXiv 2401.16438;
the authors later called the method HaLViT). A dense pair ``W2 F(W1 x)`` spends two
matrices on one job; the PE form reuses one ``W`` for both maps: ``Wᵀ F(W x)``. The first
map works in W's column space, the second in its row space, and because ``F`` moves
``W x`` out of the column space, ``Wᵀ`` still has new work to do.

Everything that ties a weight lives in :class:`TiedLinear`: one ``nn.Parameter`` ``W`` of
shape ``(out, in)``, applied as ``W`` by :meth:`TiedLinear.forward` / :meth:`TiedLinear.conv`
and as ``Wᵀ`` by :meth:`TiedLinear.forward_t` / :meth:`TiedLinear.conv_t`. No copy of ``W``
or ``Wᵀ`` is kept as a parameter or buffer: ``Wᵀ`` is applied as ``x W`` (W the right-hand GEMM
operand, read in place). The one per-call copy is the fused Q/K/V operand ``[W_q; W_kv; W_kvᵀ]`` of
:func:`fused_projection` (one GEMM instead of three; ``PeAttention.fused_qkv = False`` turns it off).

Built on it here:

* :class:`PeMlp` -- ``Wᵀ F(W x + b1) + b2`` with ``W`` of shape (hidden, dim). ``F`` is the
  block's activation (GELU by default); passing ``nn.Identity`` gives the paper's break
  condition, where ``Wᵀ W x`` stays in the row space and adds nothing new.
* :class:`PeAttention` -- the authors' attention: ``Q = W_q x``, ``K = W_kv x``,
  ``V = W_kvᵀ x``, output projection ``W_qᵀ``; two d×d matrices instead of four, all four
  biases kept. Other tie patterns (``ATTN_FORMS``) exist for ablations.

Both are drop-in ``mlp_layer`` / ``attn_layer`` types for timm's ``VisionTransformer``.
"""
from __future__ import annotations

from typing import Type

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import to_2tuple, trunc_normal_
from torch.fx import _symbolic_trace

__all__ = ['TiedLinear', 'TiedT', 'TiedQKV', 'PeMlp', 'PeAttention', 'ATTN_FORMS', 'pe_attention', 'tied_modules']


_OWN = object()  # default of ``bias`` in the Wᵀ maps: the TiedLinear's own bias_t
# True while torch.fx symbolically traces (not under torch.export / compile, which see real tensors)
is_fx_tracing = getattr(_symbolic_trace, 'is_fx_symbolic_tracing', _symbolic_trace.is_fx_tracing)


class TiedLinear(nn.Module):
    """One weight ``W`` (out_features, in_features) used as ``W`` and as ``Wᵀ``.

    ``forward`` maps in -> out with ``W`` (+ ``bias``); ``forward_t`` maps out -> in with
    ``Wᵀ`` (+ ``bias_t``). ``conv`` / ``conv_t`` are the same two maps as 1×1 convolutions
    over the channel dimension of NCHW (or channels_last) tensors.
    """

    def __init__(
            self,
            in_features: int,
            out_features: int,
            bias: bool = True,
            bias_t: bool = True,
            init: str = 'trunc_normal',
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.in_features = in_features
        self.out_features = out_features
        self.init = init
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **dd))  # the one W
        self.bias = nn.Parameter(torch.empty(out_features, **dd)) if bias else None  # b of the W map
        self.bias_t = nn.Parameter(torch.empty(in_features, **dd)) if bias_t else None  # b of the Wᵀ map
        self.init_weights()

    def init_weights(self) -> None:
        """Initialise W once. timm's ``init_weights_vit_*`` call this instead of touching W."""
        if self.init == 'trunc_normal':  # timm ViT init, same as the dense twin's Linear layers
            trunc_normal_(self.weight, std=.02)
        elif self.init == 'xavier_normal':  # the authors' init for the ResNet stage W
            nn.init.xavier_normal_(self.weight)
        elif self.init == 'kaiming_normal':
            nn.init.kaiming_normal_(self.weight, mode='fan_out', nonlinearity='relu')
        else:
            raise ValueError(f"TiedLinear: unknown init '{self.init}'")
        for b in (self.bias, self.bias_t):
            if b is not None:
                nn.init.zeros_(b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)  # (..., in) -> (..., out): column space of W

    def forward_t(self, x: torch.Tensor, bias=_OWN) -> torch.Tensor:
        # (..., out) -> (..., in): row space, same W; ``bias``: another use's bias (TiedT), else bias_t
        return self._apply_t(x, self.bias_t if bias is _OWN else bias)

    def _apply_t(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        # x Wᵀᵀ = x W, so W itself is the right-hand matrix: the same GEMM as F.linear(x, W.t()),
        # but under autocast the bf16 cast of the leaf W is the cached one of forward (a W.t() view
        # is not a leaf and was cast again per call).
        y = x.reshape(-1, x.shape[-1])
        y = torch.mm(y, self.weight) if bias is None else torch.addmm(bias, y, self.weight)
        return y.view(x.shape[:-1] + (self.in_features,))  # a Size sum, not unpacking: FX can trace it

    def conv(self, x: torch.Tensor) -> torch.Tensor:
        # (B, in, H, W) -> (B, out, H, W); one view op (indexing with None is two, and two in backward)
        return F.conv2d(x, self.weight.view(self.out_features, self.in_features, 1, 1), self.bias)

    def conv_t(self, x: torch.Tensor, bias=_OWN) -> torch.Tensor:
        bias = self.bias_t if bias is _OWN else bias
        # (B, out, H, W) -> (B, in, H, W). conv2d would copy the strided Wᵀ view to a contiguous
        # weight on every call (forward and backward); channels_last input is (B, H, W, out) in
        # memory, so a linear over its last dim applies Wᵀ with no copy and stays channels_last.
        if not is_fx_tracing() and x.is_contiguous(memory_format=torch.channels_last):
            return self._apply_t(x.permute(0, 2, 3, 1), bias).permute(0, 3, 1, 2)
        return F.conv2d(x, self.weight.t()[:, :, None, None], bias)  # also what an FX graph records

    def extra_repr(self) -> str:
        return (f'in_features={self.in_features}, out_features={self.out_features}, '
                f'bias={self.bias is not None}, bias_t={self.bias_t is not None}, tied=W/Wᵀ')


def tied_modules(model: nn.Module) -> list[tuple[str, TiedLinear]]:
    """Every ``TiedLinear`` in ``model`` with its qualified name, each once."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, TiedLinear)]


class TiedConv1x1(TiedLinear):
    """A ``TiedLinear`` whose own call is the 1×1 convolution with ``W`` (a bottleneck's conv1)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)  # (B, in, H, W) -> (B, out, H, W)


class TiedT(nn.Module):
    """The ``Wᵀ`` use of a ``TiedLinear`` that lives elsewhere in the model, with its own bias.

    :func:`rowcol.halve` puts one where a dense layer pair had its second layer (``fc2``,
    ``proj``, ``conv3``), so the host module's forward is unchanged. The source is held
    outside the module tree (``_src``), so ``W`` is registered, saved, counted, initialised
    and averaged once, under the source's name; ``deepcopy`` keeps the link.
    """

    def __init__(self, src: TiedLinear, bias: bool = True, conv: bool = False, device=None, dtype=None) -> None:
        super().__init__()
        self._src = (src,)  # not a submodule: W belongs to src
        self.conv = conv
        self.bias = nn.Parameter(torch.zeros(src.in_features, device=device, dtype=dtype)) if bias else None

    @property
    def src(self) -> TiedLinear:
        return self._src[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv:
            return self.src.conv_t(x, self.bias)  # (B, out, H, W) -> (B, in, H, W)
        return self.src.forward_t(x, self.bias)  # (..., out) -> (..., in)

    def extra_repr(self) -> str:
        return f'Wᵀ of a tied W ({self.src.out_features} -> {self.src.in_features}), bias={self.bias is not None}'


def _qkv(m: nn.Module, form: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q, K, V from the projections of ``m`` (a PeAttention or TiedQKV) under tie pattern ``form``,
    one GEMM per projection (the reference the fused path is tested against)."""
    if form == 'qo_kv':
        return m.q(x), m.kv(x), m.kv.forward_t(x)  # Q = W_q x, K = W_kv x, V = W_kvᵀ x
    if form == 'qk_vo':
        return m.qk(x), m.qk.forward_t(x), m.vo(x)  # Q = W_qk x, K = W_qkᵀ x, V = W_vo x
    return m.q(x), m.k(x), m.vo(x)  # 'vo': only V (and the output) tied


def _qkv_operands(m: nn.Module, form: str, parts: str = 'qkv') -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """(weight, bias) of each projection as ``F.linear`` takes them, in the order of :func:`_qkv`;
    a Wᵀ use is the transposed view of the one W (no copy here)."""
    if parts == 'kv':
        return [(m.kv.weight, m.kv.bias), (m.kv.weight.t(), m.kv.bias_t)]  # K = W x, V = Wᵀ x
    if form == 'qo_kv':
        return [(m.q.weight, m.q.bias), (m.kv.weight, m.kv.bias), (m.kv.weight.t(), m.kv.bias_t)]
    if form == 'qk_vo':
        return [(m.qk.weight, m.qk.bias), (m.qk.weight.t(), m.qk.bias_t), (m.vo.weight, m.vo.bias)]
    return [(m.q.weight, m.q.bias), (m.k.weight, m.k.bias), (m.vo.weight, m.vo.bias)]


def fused_projection(x: torch.Tensor, operands: list[tuple[torch.Tensor, torch.Tensor | None]]) -> torch.Tensor:
    """``[x W1ᵀ + b1 | x W2ᵀ + b2 | ...]`` as one GEMM, (..., d) -> (..., sum of outs), as timm's fused qkv.

    The weights are concatenated per call (O(d²) copies against the GEMM's O(tokens · d²));
    autograd hands each use's slice of the gradient back to its W, so a W used twice gets the sum.
    """
    weight = torch.cat([w for w, _ in operands])  # (sum of outs, d): W and Wᵀ side by side
    biases = [b for _, b in operands]
    bias = None
    if any(b is not None for b in biases):
        bias = torch.cat([b if b is not None else w.new_zeros(w.shape[0]) for (w, _), b in zip(operands, biases)])
    return F.linear(x, weight, bias)


def _fuse(m: nn.Module) -> bool:
    # ONNX export folds the concatenation of initialisers into a constant that holds W twice;
    # export keeps the per-projection GEMMs, which read each W once
    return m.fused_qkv and not torch.onnx.is_in_onnx_export()


class TiedQKV(nn.Module):
    """A fused-qkv replacement ((..., d) -> (..., 3d), [q | k | v]) made of tied projections.

    For attention modules whose forward reads one ``qkv`` output (Swin's window attention,
    PVT-v2's ``kv`` with ``parts='kv'``). The output projection becomes a :class:`TiedT` of
    :attr:`out_src`. Forms as :data:`ATTN_FORMS`. ``fused_qkv``: one GEMM for all projections
    (:func:`fused_projection`), else one per projection; same outputs and gradients.
    """
    fused_qkv: bool = True

    def __init__(self, dim: int, form: str = 'qo_kv', bias: bool = True, parts: str = 'qkv',
                 device=None, dtype=None) -> None:
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        if form not in ATTN_FORMS:
            raise ValueError(f"unknown attention form '{form}', expected one of {ATTN_FORMS}")
        if parts not in ('qkv', 'kv'):
            raise ValueError(f"TiedQKV: parts must be 'qkv' or 'kv', got '{parts}'")
        self.form, self.parts = form, parts
        if parts == 'kv':  # Q and the output live in their own (tied) modules; here K = W x, V = Wᵀ x
            self.kv = TiedLinear(dim, dim, bias=bias, bias_t=bias, **dd)
        elif form == 'qo_kv':
            self.q = TiedLinear(dim, dim, bias=bias, bias_t=False, **dd)  # W_q: Q; W_qᵀ: out (TiedT)
            self.kv = TiedLinear(dim, dim, bias=bias, bias_t=bias, **dd)  # W_kv: K, W_kvᵀ: V
        elif form == 'qk_vo':
            self.qk = TiedLinear(dim, dim, bias=bias, bias_t=bias, **dd)  # W_qk: Q, W_qkᵀ: K
            self.vo = TiedLinear(dim, dim, bias=bias, bias_t=False, **dd)  # W_vo: V; W_voᵀ: out (TiedT)
        else:  # 'vo'
            self.q = nn.Linear(dim, dim, bias=bias, **dd)
            self.k = nn.Linear(dim, dim, bias=bias, **dd)
            self.vo = TiedLinear(dim, dim, bias=bias, bias_t=False, **dd)  # W_v: V; W_vᵀ: out (TiedT)

    @property
    def out_src(self) -> TiedLinear | None:
        """The TiedLinear whose transpose is the output projection (None for parts='kv')."""
        if self.parts == 'kv':
            return None
        return self.q if self.form == 'qo_kv' else self.vo

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _fuse(self):
            return fused_projection(x, _qkv_operands(self, self.form, self.parts))  # (..., 3d) or (..., 2d)
        if self.parts == 'kv':
            return torch.cat([self.kv(x), self.kv.forward_t(x)], dim=-1)  # (..., 2d): [K | V]
        return torch.cat(_qkv(self, self.form, x), dim=-1)  # (..., 3d): [Q | K | V]


class PeMlp(nn.Module):
    """``Wᵀ F(W x + b1) + b2``: timm ``Mlp`` with ``fc2`` tied to ``fc1``'s transpose.

    Same call signature as ``timm.layers.Mlp`` so it can be a ``VisionTransformer``
    ``mlp_layer``. There is deliberately no ``fc2`` module.
    """

    def __init__(
            self,
            in_features: int,
            hidden_features: int | None = None,
            out_features: int | None = None,
            act_layer: Type[nn.Module] = nn.GELU,
            norm_layer: Type[nn.Module] | None = None,
            bias: bool | tuple[bool, bool] = True,
            drop: float | tuple[float, float] = 0.,
            use_conv: bool = False,
            use_scale: bool = False,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        if out_features not in (None, in_features):
            raise ValueError(f'PeMlp: out_features ({out_features}) must equal in_features '
                             f'({in_features}); Wᵀ maps back to the input width')
        if use_conv:
            raise ValueError('PeMlp: use_conv=True is not supported (halve() ties 1x1-conv MLPs in place)')
        bias, drop = to_2tuple(bias), to_2tuple(drop)  # (W map, Wᵀ map), as timm's Mlp (fc1, fc2)
        hidden_features = hidden_features or in_features
        self.fc = TiedLinear(in_features, hidden_features, bias=bias[0], bias_t=bias[1], device=device, dtype=dtype)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop[0])
        self.norm = norm_layer(hidden_features, device=device, dtype=dtype) if norm_layer else nn.Identity()
        self.drop2 = nn.Dropout(drop[1])
        self.use_scale = use_scale
        if use_scale:  # per-use channel scales (rowcol's addition, not the paper's), start at one
            dd = {'device': device, 'dtype': dtype}
            self.scale_w = nn.Parameter(torch.ones(hidden_features, **dd))  # on W x (hidden)
            self.scale_t_in = nn.Parameter(torch.ones(hidden_features, **dd))  # on Wᵀ's input (hidden)
            self.scale_t_out = nn.Parameter(torch.ones(in_features, **dd))  # on Wᵀ's output (dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc(x)  # (B, N, hidden) = W x + b1
        if self.use_scale:
            x = x * self.scale_w
        x = self.drop1(self.act(x))
        x = self.norm(x)
        if self.use_scale:
            x = x * self.scale_t_in
        x = self.fc.forward_t(x)  # (B, N, dim) = Wᵀ F(.) + b2, the same W
        if self.use_scale:
            x = x * self.scale_t_out
        return self.drop2(x)


# Which projection serves which role. Names list the tied pairs; a projection left out of
# every pair is its own nn.Linear.
#   qo_kv : Q = W_q x, K = W_kv x, V = W_kvᵀ x, out = W_qᵀ    (the authors' form, 2 matrices)
#   qk_vo : Q = W_qk x, K = W_qkᵀ x, V = W_vo x, out = W_voᵀ  (2 matrices)
#   vo    : Q = W_q x, K = W_k x, V = W_v x, out = W_vᵀ      (3 matrices)
ATTN_FORMS = ('qo_kv', 'qk_vo', 'vo')


class PeAttention(nn.Module):
    """Multi-head self-attention whose projections are tied in pairs (see ``ATTN_FORMS``).

    Call signature of ``timm.layers.Attention``. ``form`` is a class attribute so timm's
    ``VisionTransformer`` (which wants an attention *class*) can take a variant made by
    :func:`pe_attention`. All four biases (q, k, v, out) are kept when ``qkv_bias``/``proj_bias``.
    """
    form: str = 'qo_kv'
    scaled: bool = False  # the default of ``use_scale`` (a class attribute, like ``form``)
    fused_attn: bool = True
    fused_qkv: bool = True  # Q, K, V in one GEMM (:func:`fused_projection`); False: one GEMM each

    def __init__(
            self,
            dim: int,
            num_heads: int = 8,
            attn_head_dim: int | None = None,
            dim_out: int | None = None,
            qkv_bias: bool = False,
            qk_norm: bool = False,
            scale_norm: bool = False,
            proj_bias: bool = True,
            gated: bool = False,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
            norm_layer: Type[nn.Module] | None = None,
            use_scale: bool | None = None,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        use_scale = self.scaled if use_scale is None else use_scale
        if dim % num_heads:
            raise ValueError(f'PeAttention: dim ({dim}) must be divisible by num_heads ({num_heads})')
        if qk_norm or scale_norm or gated:
            raise ValueError('PeAttention: qk_norm / scale_norm / gated are not supported')
        if attn_head_dim not in (None, dim // num_heads):
            raise ValueError(f'PeAttention: attn_head_dim must be dim // num_heads ({dim // num_heads}), got '
                             f'{attn_head_dim}; the tied d×d matrices fix the attention width to dim')
        if dim_out not in (None, dim):
            raise ValueError(f'PeAttention: dim_out ({dim_out}) must equal dim ({dim}); W_qᵀ maps back to dim')
        if self.form not in ATTN_FORMS:
            raise ValueError(f"PeAttention: unknown form '{self.form}', expected one of {ATTN_FORMS}")
        dd = {'device': device, 'dtype': dtype}
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        f = self.form
        if f == 'qo_kv':
            self.q = TiedLinear(dim, dim, bias=qkv_bias, bias_t=proj_bias, **dd)  # W_q: Q, and W_qᵀ: out
            self.kv = TiedLinear(dim, dim, bias=qkv_bias, bias_t=qkv_bias, **dd)  # W_kv: K, and W_kvᵀ: V
        elif f == 'qk_vo':
            self.qk = TiedLinear(dim, dim, bias=qkv_bias, bias_t=qkv_bias, **dd)  # W_qk: Q, W_qkᵀ: K
            self.vo = TiedLinear(dim, dim, bias=qkv_bias, bias_t=proj_bias, **dd)  # W_vo: V, W_voᵀ: out
        else:  # 'vo'
            self.q = nn.Linear(dim, dim, bias=qkv_bias, **dd)
            self.k = nn.Linear(dim, dim, bias=qkv_bias, **dd)
            self.vo = TiedLinear(dim, dim, bias=qkv_bias, bias_t=proj_bias, **dd)  # W_v: V, W_vᵀ: out
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj_drop = nn.Dropout(proj_drop)
        self.use_scale = use_scale
        if use_scale:  # one channel scale per projection (rowcol's addition), starting at one
            self.scale_qkv = nn.Parameter(torch.ones(3, dim, **dd))  # on Q, K, V
            self.scale_out = nn.Parameter(torch.ones(dim, **dd))  # on the output projection

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, N, d) -> Q, K, V, each (B, H, N, D)."""
        B, N, C = x.shape
        if _fuse(self):  # one (B, N, d) x (d, 3d) GEMM, as timm's qkv Linear
            qkv = fused_projection(x, _qkv_operands(self, self.form)).view(B, N, 3, self.num_heads, self.head_dim)
            if self.use_scale:
                qkv = qkv * self.scale_qkv.view(3, self.num_heads, self.head_dim)  # one scale per projection
            return qkv.permute(2, 0, 3, 1, 4).unbind(0)  # timm's split into heads: views, no copy
        q, k, v = self._project_each(x)
        if self.use_scale:
            q, k, v = q * self.scale_qkv[0], k * self.scale_qkv[1], v * self.scale_qkv[2]
        return tuple(t.view(B, N, self.num_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))

    def _project_each(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        dev = None if is_fx_tracing() else x.device.type  # FX records the projections, not this cast
        if dev is not None and torch.is_autocast_enabled(dev) and x.dtype == torch.float32:
            # Three projections read x where timm's fused qkv reads it once; autocast would cast x
            # to bf16 for each of them. Cast once (the three input gradients then sum in bf16).
            x = x.to(torch.get_autocast_dtype(dev))
        return _qkv(self, self.form, x)

    def _out(self, x: torch.Tensor) -> torch.Tensor:
        x = self.q.forward_t(x) if self.form == 'qo_kv' else self.vo.forward_t(x)
        return x * self.scale_out if self.use_scale else x

    def forward(
            self,
            x: torch.Tensor,
            attn_mask: torch.Tensor | None = None,
            is_causal: bool = False,
    ) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self._project(x)  # (B, H, N, D) each
        if self.fused_attn:
            x = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                dropout_p=self.attn_drop.p if self.training else 0.)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)  # (B, H, N, N)
            if attn_mask is not None:
                attn = attn + attn_mask
            attn = self.attn_drop(attn.softmax(dim=-1))
            x = attn @ v
        x = x.transpose(1, 2).reshape(B, N, C)  # (B, N, C)
        return self.proj_drop(self._out(x))


_ATTN_CLASSES: dict[tuple[str, bool], type[PeAttention]] = {('qo_kv', False): PeAttention}


def pe_attention(form: str, use_scale: bool = False) -> type[PeAttention]:
    """The ``PeAttention`` class for one tie pattern (timm wants a class, not a partial)."""
    if form not in ATTN_FORMS:
        raise ValueError(f"unknown attention form '{form}', expected one of {ATTN_FORMS} "
                         f"(or 'dense' for untied attention)")
    key = (form, bool(use_scale))
    if key not in _ATTN_CLASSES:
        name = f"PeAttention_{form}{'_scaled' if use_scale else ''}"
        _ATTN_CLASSES[key] = type(name, (PeAttention,), {'form': form, 'scaled': bool(use_scale),
                                                         '__module__': __name__})
    return _ATTN_CLASSES[key]
