"""Validation top-1 of a trained dense run halved with ``init='dense'`` and not trained further.

    python benchmarks/halve_zero_shot.py results/cifar10/vit_nano_patch4_32-s0-h100 --data ../shared/data/cifar10/train

The starting point of ``rowcol train --init-from RUN``: how much the tie costs before any fine-tuning
(docs/RESULTS.md, "Closing the ViT gap"). Scores the run's own validation split (split.json).
"""
import argparse
import json
from pathlib import Path

from rowcol.apps.checkpoint import load_run
from rowcol.apps.config import config_from_dict
from rowcol.halve import halve
from rowcol.models import model_defaults
from rowcol.apps.pipeline import build_eval_data
from rowcol.apps.runtime import resolve_device
from rowcol.apps.evaluate import evaluate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('runs', nargs='+', type=Path, help='dense run directories')
    ap.add_argument('--data', required=True, help="the runs' training folder (their split.json selects the val part)")
    ap.add_argument('--attn', default='qo_kv', help="halve's attention form (or 'dense')")
    ap.add_argument('--device', default=None)
    a = ap.parse_args()
    dev = resolve_device(a.device)
    for run in a.runs:
        model, config = load_run(run)
        cfg = config_from_dict(config, str(run / 'config.json'))
        loader = _loader(run, cfg, a.data)  # decoded once, scored twice
        dense = evaluate(model.to(dev), loader, dev)['top1']
        halve(model, attn=a.attn, init='dense')
        rel = [r['rel_error'] for r in model.halve_report.tied]
        halved = evaluate(model.to(dev), loader, dev)['top1']
        print(json.dumps(dict(run=str(run), dense_top1=dense, halved_top1=halved, attn=a.attn,
                              params=model.halve_report.params_after, rel_error_mean=sum(rel) / len(rel))))


def _loader(run: Path, cfg, data: str):
    d = model_defaults(cfg.model)
    loader, _ = build_eval_data(data, cfg.data_config(), cfg.img_size or d['input_size'][-1], d['mean'], d['std'],
                                json.loads((run / 'split.json').read_text()))
    return loader


if __name__ == '__main__':
    main()
