"""``rowcol analyze``: does Wᵀ get anything new to work on? Measured on real images.

For every tied layer (:class:`~rowcol.layers.TiedLinear`) the vectors that ``Wᵀ`` is applied
to are recorded during forward passes over real images: ``F(W x + b1)`` in a PE MLP, the
attention output before ``W_qᵀ``, the block input before ``W_kvᵀ``, ``G(W x)`` per pixel in a
ResNet-PE block. For each we report the fraction of its energy outside the column space of W,

    frac = ‖(I − P) h‖² / ‖h‖²,   P = Q Qᵀ,  Q = orthonormal basis of col(W),

averaged over all recorded vectors (energy-weighted: Σ‖(I−P)h‖² / Σ‖h‖²). With ``F`` the
identity (the paper's break condition) and no bias, ``h = W x`` lies in col(W) and frac = 0.
The measure is informative only where W has more rows than columns, as in the PE MLP (W is
hidden × dim): a square attention W or the (m, C) ResNet stage W of full rank spans its whole
output space, so nothing can lie outside it (those layers are marked ``col_space_is_all``).
Also the singular values of every W and its stable rank (Σσ²/σ_max²), and the same for the dense
twin's matrices for the same slot when a dense run is given (``--dense-checkpoint``), with a plot.
"""
from __future__ import annotations

import dataclasses
import re
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn

from rowcol.apps import checkpoint as ckpt
from rowcol.apps.config import config_from_dict
from rowcol.errors import CheckpointError
from rowcol.layers import PeAttention, TiedLinear, TiedQKV, tied_modules
from rowcol.models import model_defaults
from rowcol.apps.pipeline import build_eval_data
from rowcol.apps.runtime import resolve_device

__all__ = ['outside_fraction', 'stable_rank', 'analyze_run']  # the figure: rowcol.apps.plots.plot_analysis


class _Energy:
    """Running Σ‖h‖² and Σ‖(I − P) h‖² of the vectors a tied W's transpose is applied to."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.q = torch.linalg.qr(weight.detach().double()).Q  # (out, r): basis of col(W)
        self.total = 0.
        self.outside = 0.
        self.count = 0

    def add(self, h: torch.Tensor) -> None:
        h = h.detach().double().reshape(-1, self.q.shape[0])  # (vectors, out)
        inside = (h @ self.q) @ self.q.T
        self.total += h.square().sum().item()
        self.outside += (h - inside).square().sum().item()
        self.count += h.shape[0]


def outside_fraction(weight: torch.Tensor, h: torch.Tensor) -> float:
    """Energy fraction of the rows of ``h`` (..., out) outside the column space of ``weight`` (out, in)."""
    e = _Energy(weight)
    e.add(h)
    return e.outside / max(e.total, 1e-30)


@contextmanager
def _record(model: nn.Module):
    """Record the inputs of every Wᵀ use (``forward_t`` / ``conv_t``) while active."""
    stats: dict[str, _Energy] = {}

    def wrap(name: str, m: TiedLinear, method: str, channels_last_view: bool):
        original = getattr(m, method)

        def recorded(x, *args, **kwargs):  # a TiedT passes its own bias
            h = x.movedim(1, -1) if channels_last_view else x  # conv inputs: channels to the last dim
            stats.setdefault(name, _Energy(m.weight)).add(h)
            return original(x, *args, **kwargs)
        setattr(m, method, recorded)  # instance attribute shadows the class method
    for name, m in tied_modules(model):
        wrap(name, m, 'forward_t', False)
        wrap(name, m, 'conv_t', True)
    fused = {m: m.__dict__.get('fused_qkv') for m in model.modules() if isinstance(m, (PeAttention, TiedQKV))}
    for m in fused:  # one GEMM per projection, so that every Wᵀ use passes through forward_t
        m.fused_qkv = False
    try:
        yield stats
    finally:
        for _, m in tied_modules(model):
            m.__dict__.pop('forward_t', None)
            m.__dict__.pop('conv_t', None)
        for m, own in fused.items():  # back to what the instance had (usually the class's default)
            del m.fused_qkv
            if own is not None:
                m.fused_qkv = own


def _spectrum(w: torch.Tensor) -> list[float]:
    return torch.linalg.svdvals(w.detach().double().flatten(1)).tolist()


def stable_rank(singular_values: list[float]) -> float:
    """‖W‖_F² / ‖W‖_2² = Σσ² / σ_max²: between 1 and rank(W); how spread out the spectrum is."""
    return sum(s * s for s in singular_values) / max(max(singular_values) ** 2, 1e-300)


def _dense_matrices(name: str, dense: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """The dense twin's matrices (2-D) that do the job of the tied W ``name``, by key; None when the
    tied role has no dense counterpart (e.g. the attention forms other than the authors')."""
    d = name.rsplit('.', 1)[0] if name.endswith('.weight') else name
    if m := re.match(r'(.*\.mlp)\.fc$', d):
        keys = [f'{m[1]}.fc1.weight', f'{m[1]}.fc2.weight']
    elif m := re.match(r'(.*\.attn)\.q$', d):
        keys = [f'{m[1]}.qkv.weight:q', f'{m[1]}.proj.weight']
    elif m := re.match(r'(.*\.attn)\.kv$', d):
        keys = [f'{m[1]}.qkv.weight:k', f'{m[1]}.qkv.weight:v']
    elif m := re.match(r'(layer\d+)(?:\.blocks\.(\d+))?\.w$', d):
        # one W per block (layer3.blocks.0.w): that block's pair; per stage (layer3.w): every block's
        blocks = [m[2]] if m[2] else sorted({k.split('.')[1] for k in dense if k.startswith(m[1] + '.')
                                             and k.split('.')[1].isdigit()}, key=int)
        keys = [f'{m[1]}.{b}.conv{c}.weight' for c in (1, 3) for b in blocks]
    else:
        return None
    out = {}
    for key in keys:
        k, _, part = key.partition(':')
        if k in dense:  # ':q' etc.: one third of a fused qkv weight
            out[key] = (dense[k].chunk(3)['qkv'.index(part)] if part else dense[k]).flatten(1)
    return out


def _dense_slots(name: str, dense: dict[str, torch.Tensor], shape: tuple[int, int] | None = None,
                 source: str = 'the dense checkpoint') -> dict[str, list[float]]:
    """Spectra of the dense twin's matrices that do the job of the tied W ``name``.

    With ``shape`` (the tied W's), a slot whose dense matrices are all missing or none of them has
    W's shape (either orientation) raises CheckpointError: ``dense`` is not this model's twin
    (fewer blocks or another width), and a comparison by name would pair unrelated matrices.
    ``analyze_run`` also refuses a dense model with another number of blocks (:func:`_check_depth`)."""
    mats = _dense_matrices(name, dense)
    if mats is None:
        return {}
    if shape is not None and dense and not any(tuple(w.shape) in (tuple(shape), tuple(shape)[::-1])
                                               for w in mats.values()):
        found = ', '.join(f'{k} {tuple(w.shape)}' for k, w in mats.items()) or 'no matrix'
        raise CheckpointError(
            f'{source} is not the dense twin of this run: for the tied {name} {tuple(shape)} it has {found}; '
            'it must have the same depth and width (leave out --dense-checkpoint to analyze the run alone)')
    return {k: _spectrum(w) for k, w in mats.items()}


def _depths(keys) -> dict[str, int]:
    """Blocks per ViT trunk (``blocks.N``) or ResNet stage (``layerK.N`` / ``layerK.blocks.N``)."""
    found: dict[str, set[str]] = {}
    for k in keys:
        m = re.match(r'(blocks|layer\d+)\.(?:blocks\.)?(\d+)\.', k)
        if m:
            found.setdefault(m.group(1), set()).add(m.group(2))
    return {part: len(idx) for part, idx in sorted(found.items())}


def _check_depth(model: nn.Module, dense: dict[str, torch.Tensor], source: str) -> None:
    mine, theirs = _depths(model.state_dict()), _depths(dense)
    if mine != theirs:
        raise CheckpointError(f'{source} is not the dense twin of this run: blocks per stage {theirs}, '
                              f'this run {mine} (leave out --dense-checkpoint to analyze the run alone)')


def analyze_run(run_dir: str | Path, data: str, dense_run: str | Path | None = None, num_images: int = 512,
                batch_size: int = 128, device: str | None = None, progress: bool = False) -> dict:
    """Per tied layer: outside-column-space energy fraction on real images, and spectra."""
    run_dir = Path(run_dir)
    model, config = ckpt.load_run(run_dir)
    cfg = config_from_dict(config, str(run_dir / ckpt.CONFIG))
    defaults = model_defaults(cfg.model)
    img_size = cfg.img_size or defaults['input_size'][-1]
    dense = {}
    if dense_run is not None:  # checked before the images are read
        dense_model, _ = ckpt.load_run(dense_run)
        dense = dense_model.state_dict()
        _check_depth(model, dense, f'--dense-checkpoint {dense_run}')
    dense_svs = {name: _dense_slots(name, dense, tuple(m.weight.flatten(1).shape), f'--dense-checkpoint {dense_run}')
                 for name, m in tied_modules(model)}
    # a stratified subset: every class, not the first num_images files of a class-sorted folder
    data_cfg = dataclasses.replace(cfg.data_config(), batch_size=batch_size)
    loader, _ = build_eval_data(data, data_cfg, img_size, defaults['mean'], defaults['std'], progress=progress,
                                limit=num_images)
    dev = resolve_device(device)
    model.to(dev).eval()
    seen = 0
    with _record(model) as stats, torch.no_grad():
        for x, _ in loader.batches():
            model(x[:num_images - seen].to(dev))
            seen += min(len(x), num_images - seen)
            if seen >= num_images:
                break
    layers = []
    for name, m in tied_modules(model):
        e = stats.get(name)
        sv, dense_sv = _spectrum(m.weight), dense_svs[name]
        layers.append(dict(
            name=name, shape=list(m.weight.shape), vectors=e.count if e else 0,
            col_space_is_all=e is not None and e.q.shape[1] == m.weight.shape[0]
            and torch.linalg.matrix_rank(m.weight.detach().double()).item() == m.weight.shape[0],
            outside_fraction=(e.outside / max(e.total, 1e-30)) if e else None,
            singular_values=sv, dense_singular_values=dense_sv, stable_rank=stable_rank(sv),
            dense_stable_rank={k: stable_rank(v) for k, v in dense_sv.items()}))
    return dict(checkpoint=str(run_dir), model=cfg.model, data=str(data), num_images=seen,
                dense_checkpoint=str(dense_run) if dense_run else None, layers=layers)
