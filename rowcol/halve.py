"""``rowcol.halve``: tie the layer pairs of any timm model, from scratch or from trained weights.

Paper: "Do deep neural networks utilize the weight space efficiently?" (arXiv 2401.16438). A
dense pair ``W2 F(W1 x)`` becomes ``Wᵀ F(W x)`` with one ``W`` (:class:`rowcol.layers.TiedLinear`):

* timm ``Mlp`` (ViT, DeiT, Swin, MLP-Mixer, ConvNeXt's channels-last MLP) becomes
  :class:`rowcol.layers.PeMlp` (the registered PE ViTs' layer, same state-dict keys);
* timm ``Attention`` (a fused ``qkv`` and a ``proj`` of the same width) becomes
  :class:`rowcol.layers.PeAttention` of the chosen form;
* other pairs keep their host module and its forward: the first layer becomes the
  ``TiedLinear`` that owns ``W``, the second a :class:`rowcol.layers.TiedT` (``Wᵀ`` and its own
  bias). So PVT-v2's MLP (depthwise conv between fc1 and the activation), ConvNeXt-V2's
  GRN MLP, 1×1-conv MLPs, Swin's window attention (a :class:`rowcol.layers.TiedQKV` as its
  ``qkv``), PVT-v2's attention (separate ``q`` and ``kv``; the authors' form only) and
  timm's ResNet ``Bottleneck`` (``conv3 = conv1ᵀ`` where the block's input and output widths
  match: one W per block, no change of layout).

What cannot be tied (gated MLPs, mismatched widths, q/k norms, unknown attention classes) stays
dense and is listed with its reason in ``model.halve_report``.

Initialisation: ``init='scratch'`` gives each new W the init of rowcol's registered PE models
(truncated normal, std 0.02, for linear layers; Kaiming normal, fan-out, for 1×1 convs) and zero
biases; every other weight of the model is left as it is (call it on a freshly built model for a
PE model from scratch). ``init='dense'`` starts from the model's trained weights: for a pair
(W1, W2) the single W closest to both in least squares, ``(W1 + W2ᵀ)/2``; every bias kept; the
report gives ‖W1 − W‖/‖W1‖ per tied pair.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
import torch.nn as nn
from timm.layers import Attention, Mlp, trunc_normal_

from rowcol.errors import RowcolError
from rowcol.layers import ATTN_FORMS, PeAttention, PeMlp, TiedConv1x1, TiedLinear, TiedQKV, TiedT, pe_attention

__all__ = ['halve', 'HalveReport', 'NothingToHalveError', 'INITS']

INITS = ('scratch', 'dense')


class NothingToHalveError(RowcolError):
    """The model has no layer pair that ``halve`` can tie."""


@dataclass
class HalveReport:
    """What :func:`halve` did: one row per tied pair, one per pair left dense (with the reason)."""
    tied: list[dict] = field(default_factory=list)   # name, kind, saved (params), rel_error (init='dense')
    dense: list[dict] = field(default_factory=list)  # name, kind, reason
    params_before: int = 0
    params_after: int = 0
    attn: str | None = 'qo_kv'
    init: str = 'scratch'

    def __str__(self) -> str:
        lines = [f'halved: {self.params_before:,} -> {self.params_after:,} parameters '
                 f'({self.params_after / max(self.params_before, 1):.3f}), {len(self.tied)} pairs tied, '
                 f'{len(self.dense)} left dense']
        lines += [f"  dense  {r['name']} ({r['kind']}): {r['reason']}" for r in self.dense]
        return '\n'.join(lines)


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # each Parameter once, so each shared W once


def _kind(m: nn.Module) -> str:
    return type(m).__name__


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, attr = name.rpartition('.')
    setattr(model.get_submodule(parent) if parent else model, attr, new)


def _mat(layer: nn.Module) -> torch.Tensor:
    """The (out, in) matrix of a Linear or 1×1 Conv2d."""
    w = layer.weight
    return w[:, :, 0, 0] if w.dim() == 4 else w


def _is_1x1(layer: nn.Module) -> bool:
    return (isinstance(layer, nn.Conv2d) and layer.kernel_size == (1, 1) and layer.stride == (1, 1)
            and layer.groups == 1 and layer.padding in ((0, 0), 'valid'))


def _pair_ok(l1: nn.Module, l2: nn.Module) -> str | None:
    """None when ``l2`` can be ``l1``ᵀ, else the reason it cannot."""
    if type(l1) is not type(l2) or not (isinstance(l1, nn.Linear) or _is_1x1(l1) and _is_1x1(l2)):
        return f'{_kind(l1)} and {_kind(l2)} are not two Linear or two 1×1 conv layers'
    (o1, i1), (o2, i2) = _mat(l1).shape, _mat(l2).shape
    if (o2, i2) != (i1, o1):
        return f'widths do not transpose: first {i1} -> {o1}, second {i2} -> {o2}'
    return None


class _Halver:
    def __init__(self, model: nn.Module, mlp: bool, attn: str | None, init: str, use_scale: bool) -> None:
        self.model, self.mlp, self.attn, self.init, self.use_scale = model, mlp, attn, init, use_scale
        self.report = HalveReport(attn=attn, init=init)

    # -- helpers
    def _new_w(self, l1: nn.Module, bias: bool, bias_t: bool, conv: bool = False) -> TiedLinear:
        w1 = _mat(l1)
        cls = TiedConv1x1 if conv else TiedLinear
        return cls(w1.shape[1], w1.shape[0], bias=bias, bias_t=bias_t,
                   init='kaiming_normal' if conv else 'trunc_normal', device=w1.device, dtype=w1.dtype)

    @torch.no_grad()
    def _fill(self, name: str, kind: str, w: TiedLinear, l1: nn.Module, l2: nn.Module,
              b1: nn.Parameter | None, b2: nn.Parameter | None) -> None:
        """W from (l1, l2) for init='dense' (and the biases into b1, b2); a report row either way."""
        row = dict(name=name, kind=kind, saved=_mat(l2).numel())
        if self.init == 'dense':
            acc = torch.promote_types(_mat(l1).dtype, torch.float32)  # at least fp32 for the mean
            w1, w2 = _mat(l1).to(acc), _mat(l2).to(acc)
            w_new = (w1 + w2.t()) / 2  # the W closest to W1 and W2ᵀ in least squares
            w.weight.copy_(w_new)
            row['rel_error'] = ((w1 - w_new).norm() / w1.norm().clamp_min(1e-12)).item()
            for dst, src in ((b1, l1.bias), (b2, l2.bias)):
                if dst is not None and src is not None:
                    dst.copy_(src)
        self.report.tied.append(row)

    def _skip(self, name: str, m: nn.Module, reason: str) -> None:
        self.report.dense.append(dict(name=name, kind=_kind(m), reason=reason))

    # -- MLPs
    def mlp_timm(self, name: str, m: Mlp) -> None:
        l1, l2 = m.fc1, m.fc2
        if (why := _pair_ok(l1, l2)) is not None:
            return self._skip(name, m, why)
        bias = l1.bias is not None
        if isinstance(l1, nn.Linear) and bias == (l2.bias is not None):
            dev = dict(device=l1.weight.device, dtype=l1.weight.dtype)
            pe = PeMlp(l1.in_features, l1.out_features, act_layer=nn.Identity, bias=bias,
                       use_scale=self.use_scale, **dev)
            pe.act, pe.drop1, pe.norm, pe.drop2 = m.act, m.drop1, m.norm, m.drop2  # the model's own
            self._fill(name, 'Mlp', pe.fc, l1, l2, pe.fc.bias, pe.fc.bias_t)
            return _set(self.model, name, pe)
        return self.mlp_generic(name, m)

    def mlp_generic(self, name: str, m: nn.Module) -> None:
        """Any MLP whose forward calls ``self.fc1`` then ``self.fc2`` (PVT-v2, GRN, 1×1 convs)."""
        l1, l2 = m.fc1, m.fc2
        if (why := _pair_ok(l1, l2)) is not None:
            return self._skip(name, m, why)
        conv = not isinstance(l1, nn.Linear)
        w = self._new_w(l1, bias=l1.bias is not None, bias_t=False, conv=conv)
        t = TiedT(w, bias=l2.bias is not None, conv=conv, device=w.weight.device, dtype=w.weight.dtype)
        self._fill(name, _kind(m), w, l1, l2, w.bias, t.bias)
        m.fc1, m.fc2 = w, t  # fc1 owns W; fc2 applies Wᵀ

    def bottleneck(self, name: str, m: nn.Module) -> None:
        l1, l3 = m.conv1, m.conv3
        if getattr(m, 'downsample', None) is not None:
            return self._skip(name, m, f'conv1 reads {_mat(l1).shape[1]} channels, conv3 writes '
                              f'{_mat(l3).shape[0]} (a projection shortcut block)')
        if (why := _pair_ok(l1, l3)) is not None:
            return self._skip(name, m, why)
        w = self._new_w(l1, bias=l1.bias is not None, bias_t=False, conv=True)
        t = TiedT(w, bias=l3.bias is not None, conv=True, device=w.weight.device, dtype=w.weight.dtype)
        self._fill(name, 'Bottleneck', w, l1, l3, w.bias, t.bias)
        m.conv1, m.conv3 = w, t  # conv3 = conv1ᵀ, one W per block

    # -- attention
    def attn_timm(self, name: str, m: Attention) -> None:
        dim = m.qkv.in_features
        if m.qkv.out_features != 3 * dim or m.proj.in_features != dim or m.proj.out_features != dim:
            return self._skip(name, m, f'inner width {m.qkv.out_features // 3} differs from the model width {dim}')
        if not (isinstance(m.q_norm, nn.Identity) and isinstance(m.k_norm, nn.Identity)
                and isinstance(getattr(m, 'norm', nn.Identity()), nn.Identity)):
            return self._skip(name, m, 'q/k norms (or a scale norm) sit between the projections')
        qb, pb = m.qkv.bias is not None, m.proj.bias is not None
        dev = dict(device=m.qkv.weight.device, dtype=m.qkv.weight.dtype)
        pe = pe_attention(self.attn, self.use_scale)(dim, m.num_heads, qkv_bias=qb, proj_bias=pb, **dev)
        pe.attn_drop, pe.proj_drop, pe.fused_attn = m.attn_drop, m.proj_drop, m.fused_attn
        self._fill_attn(name, pe, m.qkv, m.proj)
        _set(self.model, name, pe)

    def attn_window(self, name: str, m: nn.Module) -> None:
        """An attention module whose forward calls ``self.qkv`` and ``self.proj`` (Swin)."""
        dim = m.qkv.in_features
        if m.qkv.out_features != 3 * dim or m.proj.in_features != dim or m.proj.out_features != dim:
            return self._skip(name, m, f'inner width {m.qkv.out_features // 3} differs from the model width {dim}')
        dev = dict(device=m.qkv.weight.device, dtype=m.qkv.weight.dtype)
        qkv = TiedQKV(dim, self.attn, bias=m.qkv.bias is not None, **dev)
        proj = TiedT(qkv.out_src, bias=m.proj.bias is not None, **dev)
        self._fill_attn(name, qkv, m.qkv, m.proj, proj_bias=proj.bias)
        m.qkv, m.proj = qkv, proj

    def attn_pvt(self, name: str, m: nn.Module) -> None:
        """PVT-v2: ``q`` and ``kv`` separate (K, V from the spatially reduced tokens)."""
        if self.attn != 'qo_kv':
            return self._skip(name, m, f"attn='{self.attn}': PVT-v2's separate q and kv projections map "
                                       "onto the authors' form qo_kv only")
        dim = m.q.in_features
        dev = dict(device=m.q.weight.device, dtype=m.q.weight.dtype)
        q = self._new_w(m.q, bias=m.q.bias is not None, bias_t=False)
        proj = TiedT(q, bias=m.proj.bias is not None, **dev)
        kv = TiedQKV(dim, 'qo_kv', bias=m.kv.bias is not None, parts='kv', **dev)
        wk, wv = _split(m.kv, 2)
        self._fill(f'{name}.q', 'Attention (PVT-v2) q/out', q, m.q, m.proj, q.bias, proj.bias)
        self._fill(f'{name}.kv', 'Attention (PVT-v2) k/v', kv.kv, wk, wv, kv.kv.bias, kv.kv.bias_t)
        m.q, m.kv, m.proj = q, kv, proj

    def _fill_attn(self, name: str, pe: nn.Module, qkv: nn.Linear, proj: nn.Linear,
                   proj_bias: nn.Parameter | None = None) -> None:
        """The tied pairs of a fused qkv + proj: (W_q, W_out), (W_k, W_v) for qo_kv, and so on."""
        if self.init == 'scratch':  # the untied q, k of form 'vo' start like the tied W (timm's ViT init)
            for lin in (m for m in pe.modules() if type(m) is nn.Linear):
                trunc_normal_(lin.weight, std=.02)
                if lin.bias is not None:
                    nn.init.zeros_(lin.bias)
        q, k, v = _split(qkv, 3)
        kind, f = _kind(pe), self.attn
        if f == 'qo_kv':
            self._fill(f'{name}.q', kind, pe.q, q, proj, pe.q.bias, pe.q.bias_t if proj_bias is None else proj_bias)
            self._fill(f'{name}.kv', kind, pe.kv, k, v, pe.kv.bias, pe.kv.bias_t)
        elif f == 'qk_vo':
            self._fill(f'{name}.qk', kind, pe.qk, q, k, pe.qk.bias, pe.qk.bias_t)
            self._fill(f'{name}.vo', kind, pe.vo, v, proj, pe.vo.bias, pe.vo.bias_t if proj_bias is None else proj_bias)
        else:
            if self.init == 'dense':
                with torch.no_grad():
                    for dst, src in ((pe.q, q), (pe.k, k)):
                        dst.weight.copy_(src.weight)
                        if dst.bias is not None:
                            dst.bias.copy_(src.bias)
            self._fill(f'{name}.vo', kind, pe.vo, v, proj, pe.vo.bias, pe.vo.bias_t if proj_bias is None else proj_bias)

    # -- the walk
    def run(self) -> HalveReport:
        from timm.layers.mlp import ConvMlp, GatedMlp, GlobalResponseNormMlp, GluMlp, SwiGLU
        from timm.models.pvt_v2 import Attention as PvtAttention
        from timm.models.pvt_v2 import MlpWithDepthwiseConv
        from timm.models.resnet import Bottleneck
        from timm.models.swin_transformer import WindowAttention
        self.report.params_before = _count(self.model)
        todo = []
        for name, m in self.model.named_modules():
            if isinstance(m, (PeMlp, PeAttention, TiedLinear, TiedT, TiedQKV)):
                continue
            if isinstance(m, (GluMlp, SwiGLU, GatedMlp)):
                todo.append((name, m, 'gated'))
            elif type(m) is Mlp or isinstance(m, (MlpWithDepthwiseConv, GlobalResponseNormMlp, ConvMlp)):
                todo.append((name, m, 'mlp'))
            elif isinstance(m, Bottleneck):
                todo.append((name, m, 'bottleneck'))
            elif isinstance(m, Attention) and type(m) is Attention:
                todo.append((name, m, 'attn_timm'))
            elif isinstance(m, WindowAttention):
                todo.append((name, m, 'attn_window'))
            elif isinstance(m, PvtAttention):
                todo.append((name, m, 'attn_pvt'))
            elif 'attention' in _kind(m).lower() and any(hasattr(m, a) for a in ('qkv', 'q', 'proj')):
                todo.append((name, m, 'unknown_attn'))
        for name, m, what in todo:
            if what == 'gated':
                if self.mlp:
                    self._skip(name, m, 'gated MLP (fc1 feeds a value and a gate): no single W then Wᵀ')
            elif what in ('mlp', 'bottleneck'):
                if not self.mlp:
                    self._skip(name, m, 'mlp=False')
                elif what == 'bottleneck':
                    self.bottleneck(name, m)
                elif type(m) is Mlp:
                    self.mlp_timm(name, m)
                else:
                    self.mlp_generic(name, m)
            elif self.attn is None:
                self._skip(name, m, 'attn=None (attention kept dense)')
            elif what == 'unknown_attn':
                self._skip(name, m, f'{_kind(m)} is not an attention class halve knows')
            else:
                getattr(self, what)(name, m)
        self.report.params_after = _count(self.model)
        return self.report


def _split(fused: nn.Linear, parts: int) -> list[SimpleNamespace]:
    """The ``parts`` row blocks of a fused projection (e.g. qkv): views with ``weight`` and ``bias``."""
    n = fused.out_features // parts
    return [SimpleNamespace(weight=fused.weight[i * n:(i + 1) * n],
                            bias=None if fused.bias is None else fused.bias[i * n:(i + 1) * n])
            for i in range(parts)]


def halve(model: nn.Module, *, mlp: bool = True, attn: str | None = 'qo_kv', init: str = 'scratch',
          use_scale: bool = False) -> nn.Module:
    """Tie every eligible layer pair of ``model`` in place; returns ``model`` (with ``halve_report``).

    Like ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` the model is changed in place; copy it
    first (``copy.deepcopy``) to keep the dense one. ``attn``: a form of ``ATTN_FORMS``, or
    None / ``'dense'`` to keep attention untied. ``init``: ``'scratch'`` or ``'dense'`` (module
    docstring). ``use_scale``: per-use channel scales in the MLPs and attentions that become
    ``PeMlp`` / ``PeAttention``. Raises :class:`NothingToHalveError` when nothing can be tied.
    """
    if attn == 'dense':
        attn = None
    if attn is not None and attn not in ATTN_FORMS:
        raise ValueError(f"halve: unknown attn '{attn}', expected one of {ATTN_FORMS}, 'dense' or None")
    if init not in INITS:
        raise ValueError(f"halve: unknown init '{init}', expected one of {INITS}")
    report = _Halver(model, mlp, attn, init, use_scale).run()
    if not report.tied:
        reasons = '; '.join(f"{r['name']}: {r['reason']}" for r in report.dense[:3])
        arch = (getattr(model, 'pretrained_cfg', None) or {}).get('architecture') or type(model).__name__
        raise NothingToHalveError(f'{arch}: nothing to halve (no MLP, attention or '
                                  f'bottleneck pair can be tied{": " + reasons if reasons else ""})')
    model.halve_report = report
    return model
