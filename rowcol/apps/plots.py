"""Metrics files and figures: a run's ``metrics.jsonl``, its curves, a confusion matrix, the analysis.

matplotlib is imported inside the plotting functions only, so importing this module (and the
training loop, which writes ``curves.png`` at every epoch's checkpoint) costs nothing until a
figure is drawn. Every file is written atomically (:func:`rowcol.apps.fileio.atomic_write`).
"""
from __future__ import annotations

import json
from pathlib import Path

from rowcol.apps.fileio import atomic_write, write_text

__all__ = ['METRICS', 'read_metrics', 'write_metrics', 'plot_curves', 'plot_confusion', 'plot_analysis']

METRICS = 'metrics.jsonl'  # one JSON object per epoch, in a run directory


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The rows of ``run_dir``'s metrics.jsonl; none if it has no such file."""
    path = Path(run_dir) / METRICS
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def write_metrics(run_dir: str | Path, rows: list[dict]) -> None:
    """``rows`` as ``run_dir``'s metrics.jsonl, one line each, replacing the file whole."""
    write_text(Path(run_dir) / METRICS, ''.join(json.dumps(r) + '\n' for r in rows))


def _figure(size: tuple[float, float]):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=size)
    FigureCanvasAgg(fig)
    return fig


def _save_png(fig, path: str | Path) -> None:
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format='png', dpi=100))


def plot_curves(path: str | Path, runs: dict[str, list[dict]]) -> None:
    """Loss (train solid, val dashed) and validation top-1 per epoch, one colour per run."""
    fig = _figure((9, 3.5))
    ax1, ax2 = fig.subplots(1, 2)
    for label, rows in runs.items():
        ep = [r['epoch'] for r in rows]
        prefix = f'{label} ' if label else ''
        ax1.plot(ep, [r['train_loss'] for r in rows], label=f'{prefix}train')
        if rows and 'val_loss' in rows[0]:
            ax1.plot(ep, [r['val_loss'] for r in rows], '--', label=f'{prefix}val')
            ax2.plot(ep, [r['val_top1'] for r in rows], label=label or 'val top-1')
    ax1.set(xlabel='epoch', ylabel='loss')
    ax2.set(xlabel='epoch', ylabel='val top-1 (%)')
    for a in (ax1, ax2):
        a.grid(alpha=.3)
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=8)
    _save_png(fig, path)


def plot_confusion(confusion: list[list[int]], classes: list[str], path: str | Path, title: str = '') -> None:
    """Row-normalised confusion matrix as a PNG (rows: true class, columns: predicted)."""
    import torch
    c = torch.tensor(confusion, dtype=torch.float64)
    norm = c / c.sum(1, keepdim=True).clamp(min=1)
    n = len(classes)
    fig = _figure((1 + 0.5 * n, 0.8 + 0.45 * n))
    ax = fig.subplots()
    ax.imshow(norm.numpy(), cmap='Blues', vmin=0, vmax=1)
    if n <= 20:
        ax.set_xticks(range(n), classes, rotation=90)
        ax.set_yticks(range(n), classes)
        for i in range(n):
            for j in range(n):
                ax.text(j, i, int(c[i, j]), ha='center', va='center', fontsize=7,
                        color='white' if norm[i, j] > 0.5 else 'black')
    ax.set(xlabel='predicted', ylabel='true', title=title)
    _save_png(fig, path)


def plot_analysis(result: dict, path: str | Path) -> None:
    """``rowcol analyze``'s result. Left: outside fraction per tied layer. Right: normalised
    spectra (W solid, dense twin dashed)."""
    import torch
    layers = [r for r in result['layers'] if r['outside_fraction'] is not None]
    fig = _figure((11, 4))
    ax1, ax2 = fig.subplots(1, 2)
    ax1.bar(range(len(layers)), [r['outside_fraction'] for r in layers])
    ax1.set_xticks(range(len(layers)), [r['name'] for r in layers], rotation=90, fontsize=6)
    ax1.set(ylabel='energy outside col(W)', title=f"{result['model']}: what Wᵀ receives")
    for r in layers[:: max(1, len(layers) // 6)]:
        sv = torch.tensor(r['singular_values'])
        line, = ax2.plot((sv / sv[0]).tolist(), label=r['name'])
        for k, dsv in r['dense_singular_values'].items():
            dsv = torch.tensor(dsv)
            ax2.plot((dsv / dsv[0]).tolist(), '--', color=line.get_color(), alpha=.6)
    ax2.set(xlabel='index', ylabel='σ / σ_max', title='singular values (dashed: dense twin)')
    ax2.legend(fontsize=6)
    _save_png(fig, path)
