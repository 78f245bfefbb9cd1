"""``rowcol compare`` and ``rowcol demo``: a PE model and its dense twin, trained alike.

Both runs share the recipe, epochs, seed, data order, augmentation draws and split; only the
model differs. The output directory holds ``dense/`` and ``pe/`` run directories,
``report.json``, ``report.md`` and ``curves.png`` (both runs overlaid).
"""
from __future__ import annotations

import dataclasses
import json
import platform
import subprocess
from pathlib import Path
from typing import Optional

import torch

from rowcol import checkpoint as ckpt
from rowcol.config import TrainConfig
from rowcol.errors import ConfigError, RunExistsError
from rowcol.models import create_model, dense_twin, model_defaults
from rowcol.stats import count_macs, count_params
from rowcol.train import _read_metrics, resume_config, train

__all__ = ['compare', 'format_report']


def _git_commit() -> str:
    try:
        out = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or 'unknown'
    except (OSError, subprocess.SubprocessError):
        return 'unknown'


def _summary(name: str, run_dir: Path, cfg: TrainConfig, num_classes: int) -> dict:
    rows = _read_metrics(run_dir)
    model = create_model(name, img_size=cfg.img_size, num_classes=num_classes, **cfg.model_kwargs)
    size = cfg.img_size or model_defaults(name)['input_size'][-1]
    last = rows[-1] if rows else {}
    return dict(model=name, run=str(run_dir), params=count_params(model), macs=count_macs(model, (3, size, size)),
                epochs=len(rows), val_top1=last.get('val_top1'), val_top5=last.get('val_top5'),
                best_val_top1=max((r['val_top1'] for r in rows if 'val_top1' in r), default=None),
                train_seconds=round(sum(r['seconds'] for r in rows), 1),
                img_per_s=round(sum(r['img_per_s'] for r in rows) / max(len(rows), 1), 1))


def _plot(out: Path, runs: dict[str, list[dict]]) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(9, 3.5))
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    for label, rows in runs.items():
        ep = [r['epoch'] for r in rows]
        ax1.plot(ep, [r['train_loss'] for r in rows], label=f'{label} train')
        if rows and 'val_top1' in rows[0]:
            ax1.plot(ep, [r['val_loss'] for r in rows], '--', label=f'{label} val')
            ax2.plot(ep, [r['val_top1'] for r in rows], label=label)
    ax1.set(xlabel='epoch', ylabel='loss')
    ax2.set(xlabel='epoch', ylabel='val top-1 (%)')
    for a in (ax1, ax2):
        a.grid(alpha=.3)
        a.legend(fontsize=8)
    fig.tight_layout()
    ckpt.atomic_write(out / 'curves.png', lambda tmp: fig.savefig(tmp, format='png', dpi=100))


def format_report(report: dict) -> str:
    d, p = report['dense'], report['pe']
    def pct(v):
        return '-' if v is None else f'{v:.2f}'
    rows = [('params', f"{d['params']:,}", f"{p['params']:,}", f"{p['params'] / d['params']:.3f}"),
            ('MACs / image', f"{d['macs']:,}", f"{p['macs']:,}", f"{p['macs'] / d['macs']:.3f}"),
            ('val top-1 (%, last epoch)', pct(d['val_top1']), pct(p['val_top1']), ''),
            ('val top-5 (%, last epoch)', pct(d['val_top5']), pct(p['val_top5']), ''),
            ('best val top-1 (%)', pct(d['best_val_top1']), pct(p['best_val_top1']), ''),
            ('train time (s)', f"{d['train_seconds']}", f"{p['train_seconds']}", ''),
            ('train img/s', f"{d['img_per_s']}", f"{p['img_per_s']}",
             f"{p['img_per_s'] / d['img_per_s']:.3f}" if d['img_per_s'] else '')]
    lines = [f"| | dense: {d['model']} | PE: {p['model']} | PE/dense |", '|---|---|---|---|']
    lines += [f'| {a} | {b} | {c} | {r} |' for a, b, c, r in rows]
    meta = report['meta']
    lines += ['', f"Recipe `{meta['recipe']}`, {meta['epochs']} epochs, seed {meta['seed']}, data `{meta['data']}`; "
              f"commit {meta['commit']}, {meta['machine']}, torch {meta['torch']}, {meta['threads']} threads.",
              '', f"Command: `{meta['command']}`"]
    return '\n'.join(lines)


def compare(cfg: TrainConfig, output: str | Path, dense: Optional[str] = None, resume: bool = False,
            overwrite: bool = False, progress: bool = True, command: str = '') -> dict:
    """Train ``dense`` (default: the twin of ``cfg.model``) and ``cfg.model`` alike; write the report."""
    output = Path(output)
    dense = dense or dense_twin(cfg.model)
    if dense is None:
        raise ConfigError(f"{cfg.model} has no registered dense twin; pass --dense NAME")
    if output.exists() and any(output.iterdir()) and not (resume or overwrite):
        raise RunExistsError(f'{output} already holds a comparison; pass --resume or --overwrite')
    results, curves = {}, {}
    for role, name in (('dense', dense), ('pe', cfg.model)):
        run_dir = output / role
        run_cfg = dataclasses.replace(cfg, model=name)
        can_resume = resume and (run_dir / ckpt.STATE).exists()
        if can_resume:
            run_cfg = resume_config(run_dir, {'epochs': cfg.epochs})
            done = _read_metrics(run_dir)
            if len(done) < run_cfg.epochs:
                train(run_cfg, run_dir, resume=True, progress=progress)
        else:
            train(run_cfg, run_dir, overwrite=overwrite, progress=progress)
        num_classes = ckpt.read_json(run_dir / ckpt.CONFIG)['num_classes']
        results[role] = _summary(name, run_dir, run_cfg, num_classes)
        curves[f'{role}: {name}'] = _read_metrics(run_dir)
    report = dict(results, meta=dict(
        recipe=cfg.recipe, epochs=cfg.epochs, seed=cfg.seed, data=cfg.data, commit=_git_commit(),
        machine=f'{platform.machine()} {platform.processor() or ""} {torch.get_num_threads()} threads'.strip(),
        torch=torch.__version__, threads=torch.get_num_threads(), command=command))
    ckpt.write_json(output / 'report.json', report)
    ckpt.atomic_write(output / 'report.md', lambda tmp: Path(tmp).write_text(format_report(report) + '\n'))
    _plot(output, curves)
    return report
