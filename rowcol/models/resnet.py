"""ResNet-PE: ResNet-50 whose later stages share one W per stage, used as W and Wᵀ.

Paper: "Do deep neural networks utilize the weight space efficiently?" (arXiv 2401.16438),
ResNet-50 experiments. The network is torchvision's ResNet-50 (v1.5: stride on the 3×3 conv;
7×7 stem and max-pool; widths 64/128/256/512, expansion 4, blocks 3/4/6/3). Stages 1-2 are
timm's standard ``Bottleneck`` with 1×1 projection shortcuts. Stages 3-4 are PE stages
(:class:`PeStage`); for input width C_in, bottleneck width m, output width C = 4m, stride s:

* one W of shape (m, C) per stage (:class:`rowcol.layers.TiedLinear`, Xavier-normal init),
  the 1×1 conv C→m, and transposed the 1×1 conv m→C, in every block of the stage;
* if C_in ≠ C the stage input is widened to [new, x] with
  new = GELU(BN(3×3 conv, groups=C_in, C − C_in outputs, stride 1, no bias));
* the identity of block 0 is BN(BN(depthwise 3×3 conv, stride s)) of the widened input when
  s ≠ 1 (two BNs in a row, as the authors have it), else the widened input;
* block i: h = BN(Wᵀ ReLU(BN(conv3×3(ReLU(BN(W x)))))), x = ReLU(h + identity).

The model is timm's ``ResNet`` (stem, dense stages, head, ``feature_info``, ``features_only``,
``forward_intermediates``, ``prune_intermediate_layers``, ``reset_classifier``) with only the PE
stages rowcol's own. ``pe_stages`` picks which stages (1-4) are PE; ``tie`` is ``'stage'`` (one W per stage, the
authors'), ``'block'`` (one W per block, used as W and Wᵀ) or ``'none'`` (the same layout with
its own W1 and W2 per block, to measure the tie alone). ``stem='3x3'`` replaces the 7×7 stem
and max-pool with one 3×3 stride-1 conv for 32-px images.

Deviations: like timm's ResNet-50 (the dense twin) the last BN of every block starts at zero
(``zero_init_last``); the paper does not say. Under CPU bf16 autocast the strided depthwise
identity conv runs in fp32 when a backward may follow (for speed) and returns bf16. Execution
details with the same outputs (in fp32; under bf16 autocast within its rounding): the widened tensor of a strided stage is never written (its two
parts are mapped separately), in eager training the stage entry is recomputed in the backward pass
instead of stored (``PeStage.recompute_entry``), and in eval mode the two BNs in a row act as one affine.
The CIFAR-sized models are rowcol's additions.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from torch.autograd.graph import get_gradient_edge
from timm.layers import DropPath
from timm.models import build_model_with_cfg, register_model
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint_seq
from timm.models._registry import generate_default_cfgs
from timm.models.resnet import Bottleneck, ResNet, make_blocks

from rowcol.layers import TiedLinear, is_fx_tracing
from rowcol.models._registry import CIFAR10_MEAN, CIFAR10_STD, check_pretrained, dense_twin, register_pe

__all__ = ['ResNetPE', 'PeStage', 'PeBottleneck']

TIE_MODES = ('stage', 'block', 'none')


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c)


class PeBottleneck(nn.Module):
    """One PE bottleneck. Its W comes from the stage (tie='stage') or is its own."""

    def __init__(self, width: int, mid: int, stride: int = 1, tie: str = 'stage',
                 drop_path: float = 0.) -> None:
        super().__init__()
        self.tie = tie
        if tie == 'block':
            self.w = TiedLinear(width, mid, bias=False, bias_t=False, init='xavier_normal')  # W (m, C)
        elif tie == 'none':
            self.conv1 = nn.Conv2d(width, mid, 1, bias=False)  # W1 (m, C), untied
            self.conv3 = nn.Conv2d(mid, width, 1, bias=False)  # W2 (C, m), untied
        self.bn1 = _bn(mid)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride=stride, padding=1, bias=False)
        self.bn2 = _bn(mid)
        self.act2 = nn.ReLU(inplace=True)
        self.bn3 = _bn(width)
        self.act3 = nn.ReLU(inplace=True)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def init_weights(self) -> None:
        if self.tie == 'none':  # same init as the tied W, so only the tie differs
            nn.init.xavier_normal_(self.conv1.weight)
            nn.init.xavier_normal_(self.conv3.weight)

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.bn3.weight)

    def first_map(self, x: torch.Tensor | list[torch.Tensor], w: TiedLinear | None = None) -> torch.Tensor:
        """(B, C, H, W) -> (B, m, H, W): W x (the stage's W, the block's own, or the untied conv1).

        ``x`` may be a list of tensors whose channel concatenation is the input: each part is then
        mapped by its block of W's columns and the results summed, so the concatenation is never written.
        """
        if not isinstance(x, list):  # a tensor (or an FX proxy)
            return self.conv1(x) if self.tie == 'none' else (self.w if self.tie == 'block' else w).conv(x)
        weight = self.conv1.weight.flatten(1) if self.tie == 'none' else (self.w if self.tie == 'block' else w).weight
        return _conv1x1_of_parts(x, weight)

    def forward(self, x: torch.Tensor, w: TiedLinear | None = None,
                shortcut: torch.Tensor | None = None, h: torch.Tensor | None = None) -> torch.Tensor:
        """``h``: :meth:`first_map` of ``x``, when the stage has computed it already (then ``x`` is unused)."""
        shortcut = x if shortcut is None else shortcut
        if self.tie == 'block':
            w = self.w
        h = self.first_map(x, w) if h is None else h  # (B, m, H, W): W x
        h = self.act1(self.bn1(h))
        h = self.act2(self.bn2(self.conv2(h)))  # (B, m, H/s, W/s)
        h = self.conv3(h) if self.tie == 'none' else w.conv_t(h)  # (B, C, H/s, W/s): Wᵀ G(W x)
        h = self.bn3(h)
        return self.act3(self.drop_path(h) + shortcut)  # (B, C, H/s, W/s)


def _conv1x1_of_parts(parts: list[torch.Tensor], weight: torch.Tensor) -> torch.Tensor:
    """The 1×1 conv with ``weight`` (out, sum of the parts' channels) of the parts' channel
    concatenation: one GEMM per part with its block of columns (a view of ``weight``), accumulated."""
    widths = [p.shape[1] for p in parts]
    blocks = weight.split(widths, dim=1)  # (out, c_i) views, no copy
    if not all(p.is_contiguous(memory_format=torch.channels_last) for p in parts):
        y = F.conv2d(parts[0], blocks[0][:, :, None, None])  # conv2d copies each column block
        for p, wb in zip(parts[1:], blocks[1:]):
            y = y + F.conv2d(p, wb[:, :, None, None])
        return y
    B, _, H, W = parts[0].shape
    y = None  # (B·H·W, out): channels_last parts are (B, H, W, c_i) in memory, GEMM operands as they are
    for p, wb in zip(parts, blocks):
        p2 = p.permute(0, 2, 3, 1).reshape(-1, p.shape[1])
        y = torch.mm(p2, wb.t()) if y is None else torch.addmm(y, p2, wb.t())
    return y.view(B, H, W, -1).permute(0, 3, 1, 2)  # (B, out, H, W), channels_last


class _UpcastDepthwise(torch.autograd.Function):
    """A depthwise conv (bias-free, dilation 1) of a bf16 input run in fp32, returning bf16.

    oneDNN's bf16 input gradient of a strided depthwise conv is over ten times slower than fp32's on
    the CPU (docs/PERFORMANCE.md). ``x`` is kept for backward as it came; in backward the fp32 copies
    are made a quarter of the batch at a time (whole, they set the peak memory of a CIFAR ResNet-PE
    training step), and the input gradient is the transposed convolution, which needs no copy of ``x``.
    """

    @staticmethod
    def forward(ctx, x, weight, stride, padding):
        ctx.save_for_backward(x, weight)
        ctx.conf = stride, padding
        with torch.autocast(x.device.type, enabled=False):
            return F.conv2d(x.float(), weight, None, stride, padding, 1, x.shape[1]).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        stride, padding = ctx.conf
        with torch.autocast(x.device.type, enabled=False):  # a backward called inside autocast would reach here
            return _UpcastDepthwise._grads(ctx, grad, x, weight, stride, padding)

    @staticmethod
    def _grads(ctx, grad, x, weight, stride, padding):
        gx = gw = None
        if ctx.needs_input_grad[1]:
            gw = sum(torch.ops.aten.convolution_backward(g.float(), xc.float(), weight, None, stride, padding, (1, 1),
                                                         False, (0, 0), x.shape[1], (False, True, False))[1]
                     for g, xc in zip(grad.chunk(4), x.chunk(4)))
        if ctx.needs_input_grad[0]:
            k = weight.shape[-2:]
            extra = [x.shape[2 + i] - ((grad.shape[2 + i] - 1) * stride[i] - 2 * padding[i] + k[i]) for i in (0, 1)]
            gx = torch.empty_like(x)
            for g, out in zip(grad.chunk(4), gx.chunk(4)):
                out.copy_(F.conv_transpose2d(g.float(), weight, None, stride, padding, extra, x.shape[1]))
        return gx, gw, None, None


def _hooked(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks)


def _plain_conv(conv: nn.Module, depthwise: bool = False) -> bool:
    """An ``nn.Conv2d`` without hooks or bias, of the shape the split stage entry assumes (a depthwise
    conv, or with ``depthwise=False`` a 1×1 map), whose weight it may apply in parts; anything else
    (hooked, biased, pruned, replaced) is called as itself on the widened tensor."""
    if type(conv) is not nn.Conv2d or _hooked(conv) or conv.bias is not None or conv.padding_mode != 'zeros':
        return False
    if depthwise:
        return conv.groups == conv.in_channels == conv.out_channels
    return conv.groups == 1 and conv.kernel_size == conv.stride == (1, 1) and conv.padding == (0, 0)


def _plain_training_bn(bn: nn.Module) -> bool:
    """An ``nn.BatchNorm2d`` in training mode with running statistics, which :func:`_batch_stats_norm`
    reproduces in a recomputation; anything else (frozen, synced, eval-mode) runs as itself."""
    return type(bn) is nn.BatchNorm2d and bn.training and bn.track_running_stats


def _call(bn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return bn(x)  # the module itself: its mode, hooks and running statistics


def _batch_stats_norm(bn: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """``bn(x)`` in training mode without moving its running statistics (the recomputation in backward)."""
    return F.batch_norm(x, None, None, bn.weight, bn.bias, True, 0., bn.eps)


class _RecomputedEntry(torch.autograd.Function):
    """A PE stage's entry that keeps only its input (and the parameters it read) for backward and runs
    again there.

    ``forward`` runs :meth:`PeStage._entry` without autograd, its modules called as themselves (their
    running statistics move here, once). ``backward`` runs it again with autograd, under the forward's
    autocast state and with the BatchNorms on batch statistics alone, on exactly the parameter tensors
    the forward read (where one was swapped out of its module since, as ``torch.func.functional_call``
    swaps them, or carries hooks, a stand-in for it is swapped in for the recomputation), and returns
    their gradients: hooks on the parameters run once, when autograd accumulates these, and a
    parameter changed in place between forward and backward is an error, as on the plain path. Less
    work for the host than ``torch.utils.checkpoint`` (no saved-tensor hooks, no copies of running
    statistics), which matters where a step is bound by it.

    Where the stage widens, the backward runs in two phases (:func:`_widening_grads`; a double
    backward keeps one graph): the rest of the entry is differentiated from the widening's output,
    recomputed without autograd, and then the widening on its own; in one graph its conv and BN
    outputs were live beside the gradients of the widened channels, where the CIFAR ResNet-PE's
    training step peaks.
    """

    @staticmethod
    def forward(ctx, stage: 'PeStage', slots: list[tuple[nn.Module, str]], x: torch.Tensor, *params: torch.Tensor):
        device = x.device.type
        ctx.stage, ctx.slots = stage, slots
        ctx.amp = device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)
        ctx.save_for_backward(x, *params)
        return stage._entry(x, backward=True)

    @staticmethod
    def backward(ctx, grad_h: torch.Tensor, grad_shortcut: torch.Tensor):
        x, *params = ctx.saved_tensors
        double = torch.is_grad_enabled()  # a double backward: stand-ins joined to the graph
        if double:
            stand_in = lambda t: t.view_as(t)  # noqa: E731
        else:  # new leaves on the same storage
            stand_in = lambda t: t.detach().requires_grad_(t.requires_grad)  # noqa: E731
        current = [m._parameters[n] for m, n in ctx.slots]  # put back after the recomputation
        # a parameter still in its module and without hooks is differentiated as itself (fewer ops)
        inputs = [stand_in(x)] + [p if p is cur and not p._backward_hooks and not double
                                  else stand_in(p) for p, cur in zip(params, current)]
        stage, need = ctx.stage, ctx.needs_input_grad[2:]
        widen = {id(m) for m in stage.widen.modules()} if stage.widen is not None else set()
        widening = [i for i, (m, _) in enumerate(ctx.slots, 1) if id(m) in widen]  # indices into inputs
        # in two phases where the stage widens (not in a double backward, which needs one graph): the
        # rest of the entry differentiated from the widening's output, a leaf computed without autograd,
        # then the widening itself (_widening_grads); the widening's normalised tensors are then never
        # live beside the gradients of the widened channels (the CIFAR ResNet-PE's peak memory)
        two = not double and _plain_widening(stage) and (need[0] or any(need[i] for i in widening))
        device, amp, dtype = ctx.amp
        try:
            for (m, n), t in zip(ctx.slots, inputs[1:]):
                m._parameters[n] = t
            with torch.enable_grad(), torch.autocast(device, dtype=dtype, enabled=amp):
                new = None
                if two:
                    with torch.no_grad():
                        new = stage._new(inputs[0], _batch_stats_norm).requires_grad_()
                out = stage._entry(inputs[0], _batch_stats_norm, backward=True, new=new)
            # the graph's edges, not the recomputed outputs, which nothing in backward reads: not held
            edges, grads = zip(*[(get_gradient_edge(t), g) for t, g in zip(out, (grad_h, grad_shortcut))
                                 if t.requires_grad])
            del out
            first = [n and not (two and i in widening) for i, n in enumerate(need)]
            got = list(torch.autograd.grad(edges, [t for t, n in zip(inputs, first) if n] + ([new] if two else []),
                                           grads, allow_unused=True, create_graph=double))
            del edges, grads, new
            if two:  # the gradient of the widening's output, handed over so that it is freed once used
                gx, by_param = _widening_grads(stage, inputs[0], [got.pop()], ctx.amp)
        finally:
            for (m, n), t in zip(ctx.slots, current):
                m._parameters[n] = t
        got = iter(got)
        result = [next(got) if n else None for n in first]
        if two:
            result[0] = result[0] + gx if need[0] else None
            for i in widening:
                result[i] = by_param.get(id(inputs[i])) if need[i] else None
        return (None, None) + tuple(result)


def _plain_widening(stage: 'PeStage') -> bool:
    """The widening is ``nn.Conv2d`` (weight only), ``nn.BatchNorm2d``, ``nn.GELU``, as built: what
    :func:`_widening_grads` differentiates by hand."""
    if stage.widen is None:
        return False
    conv, bn, act = stage.widen
    names = lambda m: {n for n, p in m._parameters.items() if p is not None}  # noqa: E731
    return (type(conv) is nn.Conv2d and names(conv) == {'weight'} and type(bn) is nn.BatchNorm2d
            and names(bn) <= {'weight', 'bias'} and type(act) is nn.GELU and not names(act))


def _widening_grads(stage: 'PeStage', x: torch.Tensor, held: list[torch.Tensor], amp: tuple[str, bool, torch.dtype]
                    ) -> tuple[torch.Tensor | None, dict[int, torch.Tensor]]:
    """Gradients of the widening ``GELU(BN(conv(x)))`` (BN on batch statistics): x's, and the
    parameters' by ``id`` of the tensor in the module (conv weight, BN weight and bias), given the
    gradient of its output (``held``, taken out of the list so that it is freed once used). The conv
    runs with autograd; BN and GELU by their own backward kernels, GELU's in place: at most the conv
    output, the BN output and one gradient of their size are live."""
    conv, bn, act = stage.widen
    device, enabled, dtype = amp
    with torch.enable_grad(), torch.autocast(device, dtype=dtype, enabled=enabled):
        c = conv(x)
        with torch.no_grad():
            b, mean, invstd = torch.ops.aten.native_batch_norm(c, bn.weight, bn.bias, None, None, True, 0., bn.eps)
    g = held.pop()
    with torch.no_grad():
        if g._base is None and g.dtype == b.dtype:  # a gradient of its own: overwritten
            torch.ops.aten.gelu_backward.grad_input(g, b, approximate=act.approximate, grad_input=g)
        else:
            g = torch.ops.aten.gelu_backward(g, b, approximate=act.approximate)
        del b
        affine = [t is not None and t.requires_grad for t in (bn.weight, bn.bias)]
        gc, gw, gb = torch.ops.aten.native_batch_norm_backward(
            g, c, bn.weight, None, None, mean, invstd, True, bn.eps, [c.requires_grad] + affine)
        del g
    by_param = {id(t): g for t, g in ((bn.weight, gw), (bn.bias, gb)) if g is not None}
    gx = None
    if c.requires_grad:
        wanted = [t for t in (x, conv.weight) if t.requires_grad]
        edge = get_gradient_edge(c)
        del c
        got = dict(zip(map(id, wanted), torch.autograd.grad(edge, wanted, gc)))
        gx = got.pop(id(x), None)
        by_param.update(got)
    return gx, by_param


class PeStage(nn.Module):
    """A PE stage: optional widening, strided identity for block 0, blocks sharing one W.

    The widened input [new, x] of a strided stage is never written: the depthwise conv (per
    channel) and block 0's ``W x`` (linear) map each part on their own (:meth:`_entry`). Where
    either is not a plain ``nn.Conv2d`` (hooks, pruning, a replaced module: the depthwise conv,
    or ``conv1`` with ``tie='none'``) the widened tensor is built and the module called.

    ``recompute_entry`` (eager training only): the stage entry (widening, strided identity and
    block 0's ``W x``) keeps only its input for the backward pass and runs again there
    (:class:`_RecomputedEntry`), so the entry's normalised tensors are never held; the outputs,
    gradients and running statistics are those of the plain path (tested). A module of the entry
    with hooks (which the recomputation could not run as the forward pass did) makes the stage take
    the plain path; so does ``recompute_entry = False`` (on the class or one stage), for where memory
    is not the limit. In eval mode the identity's two BatchNorms act as one per-channel affine.
    """
    recompute_entry: bool = True

    def __init__(self, in_chs: int, mid: int, depth: int, stride: int, tie: str = 'stage',
                 drop_path: Sequence[float] = ()) -> None:
        super().__init__()
        out_chs = 4 * mid
        if tie not in TIE_MODES:
            raise ValueError(f"unknown tie mode '{tie}', expected one of {TIE_MODES}")
        if out_chs != in_chs and ((out_chs - in_chs) % in_chs or out_chs < in_chs):
            raise ValueError(f'PE stage: cannot widen {in_chs} to {out_chs} channels with a grouped '
                             f'conv (groups={in_chs}); out - in must be a positive multiple of in')
        self.widen = None
        if out_chs != in_chs:
            self.widen = nn.Sequential(
                nn.Conv2d(in_chs, out_chs - in_chs, 3, padding=1, groups=in_chs, bias=False),
                _bn(out_chs - in_chs), nn.GELU())
        self.downsample = None
        if stride != 1:
            self.downsample = nn.Sequential(
                nn.Conv2d(out_chs, out_chs, 3, stride=stride, padding=1, groups=out_chs, bias=False),
                _bn(out_chs), _bn(out_chs))  # two BNs in a row, as in the authors' code
        # The one W of this stage, (m, C): every block applies it as W and as Wᵀ.
        self.w = TiedLinear(out_chs, mid, bias=False, bias_t=False, init='xavier_normal') if tie == 'stage' else None
        dp = list(drop_path) or [0.] * depth
        self.blocks = nn.ModuleList(
            PeBottleneck(out_chs, mid, stride if i == 0 else 1, tie, dp[i]) for i in range(depth))
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = None  # block 0's W x, when the entry computed it
        if self.widen is None and self.downsample is None:
            shortcut = x
        elif (slots := self._recomputed_slots()) is not None:
            h, shortcut = _RecomputedEntry.apply(self, slots, x, *[m._parameters[n] for m, n in slots])
        else:
            h, shortcut = self._entry(x)
        for i, blk in enumerate(self.blocks):
            sc, h0 = (shortcut, h) if i == 0 else (None, None)
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = torch.utils.checkpoint.checkpoint(blk, x, self.w, sc, h0, use_reentrant=False)
            else:
                x = blk(x, self.w, sc, h0)
            # with h0 given, block 0 reads only h0 and the shortcut
        return x

    def _recomputed_slots(self) -> list[tuple[nn.Module, str]] | None:
        """(module, name) of every parameter the stage entry reads, where the entry is to be
        recomputed in backward; else None. One walk over the entry's modules, on every forward."""
        if not (self.recompute_entry and torch.is_grad_enabled()) or is_fx_tracing() \
                or torch.compiler.is_compiling():  # inductor plans its own recomputation
            return None
        norms = ([self.widen[1]] if self.widen is not None else []) + \
            (list(self.downsample[1:]) if self.downsample is not None else [])
        if not all(_plain_training_bn(bn) for bn in norms):
            return None
        first = self.blocks[0]
        mapper = first.conv1 if first.tie == 'none' else (first.w if first.tie == 'block' else self.w)
        slots = []
        for top in (self.widen, self.downsample, mapper):
            for m in top.modules() if top is not None else ():
                if _hooked(m):  # hooks would not run as in the forward pass
                    return None
                slots += [(m, n) for n, p in m._parameters.items() if p is not None]
        return slots

    def _entry(self, x: torch.Tensor, norm=_call, backward: bool | None = None,
               new: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(block 0's W x, block 0's shortcut) from the stage input; ``backward``: whether a backward
        pass follows (default: grad mode), for :meth:`_depthwise`.

        The widened input [new, x] feeds only maps that act on channels separately (the depthwise
        conv, the BatchNorms) or linearly (W), so with a strided identity each part is mapped on its
        own and the widened tensor is never written; at stride 1 it is the shortcut itself.
        """
        parts = [x] if self.widen is None else [self._new(x, norm) if new is None else new, x]
        first = self.blocks[0]
        split = (self.downsample is not None and not is_fx_tracing()  # FX cannot split by traced channel counts
                 and _plain_conv(self.downsample[0], depthwise=True)
                 and (first.tie != 'none' or _plain_conv(first.conv1)))
        if not split:  # a hooked or replaced conv reads the widened tensor as itself
            x = torch.cat(parts, dim=1) if len(parts) > 1 else x  # (B, C, H, W): [new, x]
            return first.first_map(x, self.w), (x if self.downsample is None else self._downsample([x], norm, backward))
        return first.first_map(parts, self.w), self._downsample(parts, norm, backward)

    def _new(self, x: torch.Tensor, norm=_call) -> torch.Tensor:
        conv, bn, act = self.widen
        return act(norm(bn, conv(x)))  # (B, C - C_in, H, W): the channels the widening adds

    def _downsample(self, parts: list[torch.Tensor], norm=_call, backward: bool | None = None) -> torch.Tensor:
        """BN(BN(strided depthwise conv)) of the channel concatenation of ``parts``, (B, C, H/s, W/s)."""
        _, bn1, bn2 = self.downsample
        if norm is not _call or bn1.training or bn2.training or getattr(bn1, 'running_var', None) is None \
                or getattr(bn2, 'running_var', None) is None:  # a recomputation: training mode, whatever the mode now
            return norm(bn2, norm(bn1, self._depthwise(parts, backward)))
        # both BNs in eval mode: BN2(BN1(y)) is one per-channel affine y * a + b
        a1 = bn1.weight * torch.rsqrt(bn1.running_var + bn1.eps)
        a2 = bn2.weight * torch.rsqrt(bn2.running_var + bn2.eps)
        a, b = a1 * a2, (bn1.bias - bn1.running_mean * a1 - bn2.running_mean) * a2 + bn2.bias
        y = self._depthwise(parts, backward)
        return y * a[:, None, None].to(y.dtype) + b[:, None, None].to(y.dtype)

    def _depthwise(self, parts: list[torch.Tensor], backward: bool | None = None) -> torch.Tensor:
        """The strided depthwise conv of the parts' channel concatenation: each part with its own
        filters, the (strided, smaller) outputs concatenated. Under CPU autocast, when a backward may
        follow, each part runs in fp32 (:class:`_UpcastDepthwise`); without grad (inference) the
        bf16 forward is the faster one and is kept."""
        conv = self.downsample[0]
        x = parts[0]
        upcast = (not is_fx_tracing() and x.device.type == 'cpu' and torch.is_autocast_enabled('cpu')
                  and (torch.is_grad_enabled() if backward is None else backward))
        if len(parts) == 1 and (not upcast or not _plain_conv(conv, depthwise=True)):  # the module itself
            if upcast:
                with torch.autocast('cpu', enabled=False):
                    return conv(x.float()).to(x.dtype)
            return conv(x)
        filters = conv.weight.split([p.shape[1] for p in parts])
        if upcast:
            dtype = torch.get_autocast_dtype('cpu')
            return torch.cat([_UpcastDepthwise.apply(p.to(dtype), f, conv.stride, conv.padding)
                              for p, f in zip(parts, filters)], dim=1)
        return torch.cat([F.conv2d(p, f, None, conv.stride, conv.padding, conv.dilation, groups=p.shape[1])
                          for p, f in zip(parts, filters)], dim=1)


class ResNetPE(ResNet):
    """timm's ``ResNet`` (stem, dense stages, head, features, intermediates) with the stages in
    ``pe_stages`` replaced by :class:`PeStage`; ``widths`` are timm's ``channels``."""

    def __init__(
            self,
            layers: Sequence[int] = (3, 4, 6, 3),
            widths: Sequence[int] = (64, 128, 256, 512),
            pe_stages: Sequence[int] = (3, 4),
            tie: str = 'stage',
            stem: str = '7x7',
            num_classes: int = 1000,
            in_chans: int = 3,
            global_pool: str = 'avg',
            drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            zero_init_last: bool = True,
            **kwargs,
    ) -> None:
        if kwargs:
            raise TypeError(f'ResNetPE: unexpected arguments {sorted(kwargs)}')
        if any(s not in (1, 2, 3, 4) for s in pe_stages):
            raise ValueError(f'pe_stages must be stage numbers 1-4, got {tuple(pe_stages)}')
        if stem not in ('7x7', '3x3'):
            raise ValueError(f"stem must be '7x7' or '3x3', got '{stem}'")
        super().__init__(Bottleneck, tuple(layers), num_classes=num_classes, in_chans=in_chans,
                         global_pool=global_pool, stem_width=widths[0], channels=tuple(widths), drop_rate=drop_rate,
                         drop_path_rate=drop_path_rate, zero_init_last=False)
        self.pe_stages = tuple(sorted(pe_stages))
        w0 = widths[0]
        if stem == '3x3' or w0 != 64:  # timm's plain stem is 64 wide: rebuild it and the stages after it
            if stem == '3x3':  # 32-px images: one 3×3 stride-1 conv, no max-pool
                self.conv1 = nn.Conv2d(in_chans, w0, 3, stride=1, padding=1, bias=False)
                self.maxpool = nn.Identity()
            else:
                self.conv1 = nn.Conv2d(in_chans, w0, 7, stride=2, padding=3, bias=False)
            self.bn1 = _bn(w0)
            stages, info = make_blocks((Bottleneck,) * len(widths), tuple(widths), tuple(layers), w0,
                                       drop_path_rate=drop_path_rate)
            for name, stage in stages:
                setattr(self, name, stage)
            self.feature_info = [dict(num_chs=w0, reduction=2, module='act1')] + info
            if stem == '3x3':
                for f in self.feature_info:
                    f['reduction'] //= 2 if f['module'] == 'act1' else 4
        n = sum(layers)  # timm's drop-path rates; plain Python, as a tensor fails under torch.device('meta')
        dpr = [drop_path_rate * i / max(n - 1, 1) for i in range(n)]
        for i, (depth, mid) in enumerate(zip(layers, widths)):
            if i + 1 in self.pe_stages:
                in_chs = self.feature_info[i]['num_chs']  # the stem's or the previous stage's output
                dp = dpr[sum(layers[:i]):sum(layers[:i + 1])]
                setattr(self, f'layer{i + 1}', PeStage(in_chs, mid, depth, 1 if i == 0 else 2, tie, dp))
        self.init_weights(zero_init_last)

    @torch.no_grad()
    def init_weights(self, zero_init_last: bool = True) -> None:
        # Each module is visited once, so a W shared by a whole stage is initialised once.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():  # after the generic pass, which would overwrite the untied W1, W2
            if isinstance(m, (TiedLinear, PeBottleneck)):
                m.init_weights()
        if zero_init_last:
            for m in self.modules():
                if hasattr(m, 'zero_init_last'):
                    m.zero_init_last()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r'^conv1|bn1|maxpool', blocks=r'^layer(\d+)' if coarse else r'^layer(\d+)\.(?:blocks\.)?(\d+)')

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        for i in self.pe_stages:
            getattr(self, f'layer{i}').grad_checkpointing = enable

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return set()  # timm's optimizer factory already exempts norms and biases (1-D parameters)

    def _stage(self, stage: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and isinstance(stage, nn.Sequential) and not torch.jit.is_scripting():
            return checkpoint_seq(stage, x)  # PE stages checkpoint per block themselves
        return stage(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.act1(self.bn1(self.conv1(x))))  # (B, C0, H/4, W/4) or (B, C0, H, W)
        for i in range(1, 5):
            x = self._stage(getattr(self, f'layer{i}'), x)
        return x  # (B, C, h, w)

    def forward_intermediates(self, x: torch.Tensor, indices=None, norm: bool = False, stop_early: bool = False,
                              output_fmt: str = 'NCHW', intermediates_only: bool = False):
        """timm's ``ResNet.forward_intermediates`` (stem + 4 stages), PE stages run as in ``forward_features``."""
        if output_fmt != 'NCHW':
            raise ValueError('ResNetPE: output_fmt must be NCHW')
        take, max_index = feature_take_indices(5, indices)
        x = self.act1(self.bn1(self.conv1(x)))
        intermediates = [x] if 0 in take else []
        x = self.maxpool(x)
        for i in range(1, (max_index if stop_early else 4) + 1):
            x = self._stage(getattr(self, f'layer{i}'), x)
            if i in take:
                intermediates.append(x)
        return intermediates if intermediates_only else (x, intermediates)


def _create_resnet(variant: str, pretrained: bool = False, **kwargs) -> ResNetPE:
    check_pretrained(variant, pretrained, kwargs)
    model = build_model_with_cfg(ResNetPE, variant, pretrained, **kwargs)
    model.dense_twin = dense_twin(variant)  # None for the dense models registered here
    return model


def _cfg(**kwargs) -> dict:
    return {
        'url': '', 'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        'crop_pct': 0.875, 'interpolation': 'bilinear', 'mean': (0.485, 0.456, 0.406),
        'std': (0.229, 0.224, 0.225), 'first_conv': 'conv1', 'classifier': 'fc', **kwargs,
    }


_cifar = dict(num_classes=10, input_size=(3, 32, 32), pool_size=(4, 4), crop_pct=1.0,
              mean=CIFAR10_MEAN, std=CIFAR10_STD)
default_cfgs = generate_default_cfgs({
    'resnet50_pe': _cfg(),
    'resnet50_pe_untied': _cfg(),
    'resnet26_cifar': _cfg(**_cifar),
    'resnet26_pe_cifar': _cfg(**_cifar),
    'resnet26_pe_cifar_untied': _cfg(**_cifar),
    'resnet26_pe_all_cifar': _cfg(**_cifar),
})

_R50 = dict(layers=(3, 4, 6, 3), widths=(64, 128, 256, 512))
_R26_CIFAR = dict(layers=(2, 2, 2, 2), widths=(16, 32, 64, 128), stem='3x3')

register_pe('resnet50_pe', 'resnet50', 15_515_176, 13_466_176, 25_557_032)
register_pe('resnet26_pe_cifar', 'resnet26_cifar', 526_426, 521_296, 882_394)
register_pe('resnet26_pe_all_cifar', 'resnet26_cifar', 507_178, 502_048, 882_394)


@register_model
def resnet50_pe(pretrained: bool = False, **kwargs) -> ResNetPE:
    """ResNet-50-PE, the authors' layout: stages 3-4 share one W per stage. Twin: timm ``resnet50``."""
    return _create_resnet('resnet50_pe', pretrained, **dict(_R50, **kwargs))


@register_model
def resnet50_pe_untied(pretrained: bool = False, **kwargs) -> ResNetPE:
    """The ``resnet50_pe`` layout with the tie off: its own W1, W2 in every block of stages 3-4."""
    return _create_resnet('resnet50_pe_untied', pretrained, **dict(_R50, tie='none', **kwargs))


@register_model
def resnet26_cifar(pretrained: bool = False, **kwargs) -> ResNetPE:
    """Dense bottleneck ResNet-26 for 32-px images: 3×3 stem, widths 16/32/64/128, blocks 2/2/2/2."""
    return _create_resnet('resnet26_cifar', pretrained, **dict(_R26_CIFAR, pe_stages=(), **kwargs))


@register_model
def resnet26_pe_cifar(pretrained: bool = False, **kwargs) -> ResNetPE:
    """``resnet26_cifar`` with the authors' PE layout in stages 3-4."""
    return _create_resnet('resnet26_pe_cifar', pretrained, **dict(_R26_CIFAR, **kwargs))


@register_model
def resnet26_pe_cifar_untied(pretrained: bool = False, **kwargs) -> ResNetPE:
    """The ``resnet26_pe_cifar`` layout with the tie off: its own W1, W2 in every block of stages 3-4."""
    return _create_resnet('resnet26_pe_cifar_untied', pretrained, **dict(_R26_CIFAR, tie='none', **kwargs))


@register_model
def resnet26_pe_all_cifar(pretrained: bool = False, **kwargs) -> ResNetPE:
    """``resnet26_cifar`` with all four stages PE."""
    return _create_resnet('resnet26_pe_all_cifar', pretrained, **dict(_R26_CIFAR, pe_stages=(1, 2, 3, 4), **kwargs))
