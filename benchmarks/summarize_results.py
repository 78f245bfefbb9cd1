"""Write results/<dataset>/summary.json from the run directories beside it.

    python benchmarks/summarize_results.py results/cifar10

One entry per finished or unfinished run: run, model, dense (its dense twin, or null for a dense
model), seed, params, epochs (completed), val_top1 / val_top5 (last epoch), best_val_top1,
wall_seconds (training plus per-epoch evaluation time, summed over epochs; runs made before
``eval_seconds`` was logged count training time only), amp, model_kwargs.
"""
import json
import sys
from pathlib import Path

from rowcol.checkpoint import write_json
from rowcol.models import create_model, dense_twin
from rowcol.stats import count_params
from rowcol.train import read_metrics


def summarize(root: Path) -> list[dict]:
    runs = []
    for run in sorted(p for p in root.iterdir() if (p / 'config.json').is_file()):
        cfg = json.loads((run / 'config.json').read_text())
        rows = read_metrics(run)
        model = create_model(cfg['model'], img_size=cfg.get('img_size'), num_classes=cfg['num_classes'],
                             **cfg.get('model_kwargs', {}))
        last = rows[-1] if rows else {}
        runs.append(dict(run=run.name, model=cfg['model'], dense=dense_twin(cfg['model']), seed=cfg['seed'],
                         params=count_params(model), epochs=len(rows), planned_epochs=cfg['epochs'],
                         val_top1=last.get('val_top1'), val_top5=last.get('val_top5'),
                         best_val_top1=max((r['val_top1'] for r in rows), default=None),
                         wall_seconds=round(sum(r['seconds'] + r.get('eval_seconds', 0) for r in rows), 1),
                         amp=cfg['amp'],
                         model_kwargs=cfg.get('model_kwargs', {})))
    return runs


if __name__ == '__main__':
    root = Path(sys.argv[1] if len(sys.argv) > 1 else 'results/cifar10')
    runs = summarize(root)
    write_json(root / 'summary.json', runs)
    print(json.dumps(runs, indent=2))
