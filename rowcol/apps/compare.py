"""``rowcol compare`` and ``rowcol demo``: a PE model and its dense twin, trained alike.

Both runs share the recipe, epochs, seed, data order, augmentation draws and split; only the
model differs. The output directory holds ``dense/`` and ``pe/`` run directories,
``report.json``, ``report.md`` and ``curves.png`` (both runs overlaid).

``model_kwargs`` that only PE models take (``attn_form``, ``tie_mlp``, ``pe_stages``, ``tie``)
go to the PE run alone, so an ablation is compared with the plain dense twin; the report lists
the arguments of each run.
"""
from __future__ import annotations

import dataclasses
import platform
import signal
import subprocess
from pathlib import Path

import torch

from rowcol.apps import checkpoint as ckpt
from rowcol.apps.config import TrainConfig
from rowcol.errors import ConfigError, Interrupted, RunExistsError
from rowcol.apps.fileio import write_text
from rowcol.models import create_model, dense_twin, model_defaults
from rowcol.apps.plots import plot_curves, read_metrics
from rowcol.apps.rundir import resume_config
from rowcol.apps.runtime import Stop
from rowcol.stats import count_macs, count_params
from rowcol.apps.train import train

__all__ = ['compare', 'format_report', 'PE_ONLY_KWARGS']

PE_ONLY_KWARGS = frozenset({'attn_form', 'tie_mlp', 'pe_stages', 'tie'})


def _git_commit() -> str:
    try:
        out = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or 'unknown'
    except (OSError, subprocess.SubprocessError):
        return 'unknown'


def _summary(name: str, run_dir: Path, cfg: TrainConfig, num_classes: int) -> dict:
    rows = read_metrics(run_dir)
    model = create_model(name, img_size=cfg.img_size, num_classes=num_classes, **cfg.model_kwargs)
    size = cfg.img_size or model_defaults(name)['input_size'][-1]
    last = rows[-1] if rows else {}
    return dict(model=name, run=str(run_dir), params=count_params(model), macs=count_macs(model, (3, size, size)),
                epochs=len(rows), val_top1=last.get('val_top1'), val_top5=last.get('val_top5'),
                best_val_top1=max((r['val_top1'] for r in rows if 'val_top1' in r), default=None),
                train_seconds=round(sum(r['seconds'] for r in rows), 1),
                img_per_s=round(sum(r['img_per_s'] for r in rows) / max(len(rows), 1), 1))


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


def compare(cfg: TrainConfig, output: str | Path, dense: str | None = None, resume: bool = False,
            overwrite: bool = False, progress: bool = True, command: str = '',
            resume_overrides: dict | None = None) -> dict:
    """Train ``dense`` (default: the twin of ``cfg.model``) and ``cfg.model`` alike; write the report.

    With ``resume``, a run that has a checkpoint continues (taking ``resume_overrides``, the
    flags the user gave, as ``rowcol train --resume`` would); a run without one starts anew.
    """
    output = Path(output)
    dense = dense or dense_twin(cfg.model)
    if dense is None:
        raise ConfigError(f"{cfg.model} has no registered dense twin; pass --dense NAME")
    if output.exists() and any(output.iterdir()) and not (resume or overwrite):
        raise RunExistsError(f'{output} already holds a comparison; pass --resume or --overwrite')
    results, curves = {}, {}
    for role, name in (('dense', dense), ('pe', cfg.model)):
        run_dir = output / role
        kwargs = cfg.model_kwargs if role == 'pe' else \
            {k: v for k, v in cfg.model_kwargs.items() if k not in PE_ONLY_KWARGS}
        result = None
        if resume and (run_dir / ckpt.STATE).exists():
            run_cfg = resume_config(run_dir, {k: v for k, v in (resume_overrides or {}).items()
                                              if k != 'model_kwargs'})
            if len(read_metrics(run_dir)) < run_cfg.epochs:
                result = train(run_cfg, run_dir, resume=True, progress=progress)
        else:  # a run that never reached its first checkpoint is started again
            run_cfg = dataclasses.replace(cfg, model=name, model_kwargs=dict(kwargs))
            result = train(run_cfg, run_dir, overwrite=overwrite or resume, progress=progress)
        if result is not None and result.status == 'interrupted':
            raise Interrupted(f'interrupted in the {role} run; continue with: rowcol compare --resume '
                              f'--output {output} (and the same flags)', Stop.signum or signal.SIGINT)
        num_classes = ckpt.read_json(run_dir / ckpt.CONFIG)['num_classes']
        results[role] = dict(_summary(name, run_dir, run_cfg, num_classes), model_kwargs=run_cfg.model_kwargs)
        curves[f'{role}: {name}'] = read_metrics(run_dir)
    report = dict(results, meta=dict(
        recipe=cfg.recipe, epochs=cfg.epochs, seed=cfg.seed, data=cfg.data, commit=_git_commit(),
        machine=f'{platform.machine()} {platform.processor() or ""} {torch.get_num_threads()} threads'.strip(),
        torch=torch.__version__, threads=torch.get_num_threads(), command=command))
    ckpt.write_json(output / 'report.json', report)
    write_text(output / 'report.md', format_report(report) + '\n')
    plot_curves(output / 'curves.png', curves)
    return report
