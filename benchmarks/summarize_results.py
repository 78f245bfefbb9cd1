"""Write results/<dataset>/summary.json from the run directories beside it, print the mean ± std
table of docs/RESULTS.md, and plot validation curves per model family (curves-<family>.png).

    python benchmarks/summarize_results.py results/cifar10

One entry per finished run (unfinished ones are named on stderr and left out): run, model, dense (its dense twin, or null for a dense
model), seed, params, epochs (completed), val_top1 / val_top5 (last epoch), best_val_top1,
variant (model_kwargs, halving, and the models of --init-from and --teacher), teacher and init_from
(run directory names), wall_seconds (training plus per-epoch evaluation time, summed over epochs; runs made before
``eval_seconds`` was logged count training time only), amp, device (``cuda``: a lent GPU, the H100 for runs named -h100 and the H200 for -h200, with
other runs sharing it, see docs/RESULTS.md; ``cpu``: the 2-core VM; runs made before
``device_used`` was recorded and without ``--device`` ran on the CPU), model_kwargs.
"""
import json
import statistics
import sys
from pathlib import Path

from rowcol.apps.checkpoint import build_run_model, write_json
from rowcol.models import dense_twin
from rowcol.stats import count_params
from rowcol.apps.plots import plot_curves, read_metrics


def summarize(root: Path) -> list[dict]:
    runs = []
    for run in sorted(p for p in root.iterdir() if (p / 'config.json').is_file()):
        cfg = json.loads((run / 'config.json').read_text())
        rows = read_metrics(run)
        model = build_run_model(cfg, run / 'config.json')
        last = rows[-1] if rows else {}
        teacher, init_from = (Path(cfg[k]).name if cfg.get(k) else None for k in ('teacher', 'init_from'))
        runs.append(dict(run=run.name, model=cfg['model'], dense=dense_twin(cfg['model']), seed=cfg['seed'],
                         variant=_variant(cfg, root), teacher=teacher, init_from=init_from,
                         params=count_params(model), epochs=len(rows), planned_epochs=cfg['epochs'],
                         val_top1=last.get('val_top1'), val_top5=last.get('val_top5'),
                         best_val_top1=max((r['val_top1'] for r in rows), default=None),
                         wall_seconds=round(sum(r['seconds'] + r.get('eval_seconds', 0) for r in rows), 1),
                         amp=cfg['amp'], device=(cfg.get('device_used') or cfg.get('device') or 'cpu').split(':')[0],
                         model_kwargs=cfg.get('model_kwargs', {})))
    return runs


def _variant(cfg: dict, root: Path) -> str:
    """What sets a run apart from the plain model: model_kwargs, halving, init, teacher (by model, not run)."""
    parts = [f'{k}={v}' for k, v in sorted(cfg.get('model_kwargs', {}).items())]
    if cfg.get('halve'):
        parts.append(f"halved({cfg.get('halve_attn', 'qo_kv')}{', scale' if cfg.get('halve_scale') else ''})")
    for key in ('init_from', 'teacher'):
        if cfg.get(key):
            other = json.loads((root / Path(cfg[key]).name / 'config.json').read_text())['model']
            parts.append(f'{key}={other}')
    return ', '.join(parts) or '-'


def _mean_std(xs: list[float]) -> str:
    return f'{statistics.mean(xs):.2f} ± {statistics.stdev(xs):.2f}' if len(xs) > 1 else f'{xs[0]:.2f}'


def table(runs: list[dict]) -> str:
    """Finished runs grouped by (model, model_kwargs, device) over seeds: mean ± sample std."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        if r['val_top1'] is not None:
            groups.setdefault((r['model'], r['variant'], r['device']), []).append(r)
    lines = ['| model | variant | device | params | epochs | seeds | val top-1 (%) | val top-5 (%) |',
             '|---|---|---|---|---|---|---|---|']
    for (model, variant, device), rs in sorted(groups.items(), key=lambda kv: (kv[1][0]['dense'] or kv[0][0], kv[0])):
        lines.append(f"| {model} | {variant} | {device} | {rs[0]['params']:,} | {rs[0]['epochs']} | "
                     f"{','.join(str(r['seed']) for r in sorted(rs, key=lambda r: r['seed']))} | "
                     f"{_mean_std([r['val_top1'] for r in rs])} | {_mean_std([r['val_top5'] for r in rs])} |")
    return '\n'.join(lines)


def plot_families(root: Path, runs: list[dict]) -> list[Path]:
    """One curves-<family>.png per model family (the first word of the dense twin's name)."""
    families: dict[str, dict[str, list[dict]]] = {}
    for r in runs:
        family = (r['dense'] or r['model']).split('_')[0]
        families.setdefault(family, {})[r['run']] = read_metrics(root / r['run'])
    paths = []
    for family, curves in sorted(families.items()):
        paths.append(root / f'curves-{family}.png')
        plot_curves(paths[-1], curves)
    return paths


if __name__ == '__main__':
    root = Path(sys.argv[1] if len(sys.argv) > 1 else 'results/cifar10')
    runs = summarize(root)
    for r in runs:
        if r['epochs'] < r['planned_epochs']:
            print(f"unfinished, left out: {r['run']} ({r['epochs']}/{r['planned_epochs']} epochs)", file=sys.stderr)
    runs = [r for r in runs if r['epochs'] >= r['planned_epochs']]
    write_json(root / 'summary.json', runs)
    plot_families(root, runs)
    print(table(runs))
