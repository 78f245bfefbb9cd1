"""``rowcol <subcommand>``: the command line. Library errors become exit code 2 here, nowhere else."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable, Sequence

from rowcol.errors import ConfigError, Interrupted, RowcolError


def _cmd_params(args: argparse.Namespace) -> int:
    from rowcol.apps.report import format_table, param_rows
    if args.halve and not args.models:
        raise ConfigError('params --halve: name the dense timm model(s) to halve, e.g. rowcol params --halve resnet50')
    rows = param_rows(args.models or None, num_classes=args.num_classes, img_size=args.img_size,
                      halve_attn=args.halve_attn if args.halve else None)
    print(json.dumps(rows, indent=2) if args.json else format_table(rows))
    return 0


def _add_params(sub) -> None:
    p = sub.add_parser('params', help='parameters and MACs of PE models next to their dense twins')
    p.add_argument('models', nargs='*', metavar='MODEL', help='model names (default: every PE model)')
    p.add_argument('--num-classes', type=int, default=None, help='classifier size (default: the model\'s own)')
    p.add_argument('--img-size', type=int, default=None, help='square input size (default: the model\'s own)')
    p.add_argument('--halve', action='store_true', help='the models are dense timm models: measure each as it '
                   'is and halved with rowcol.halve')
    p.add_argument('--halve-attn', default='qo_kv', choices=['qo_kv', 'qk_vo', 'vo', 'dense'],
                   help='attention form for --halve (default: the authors\' qo_kv)')
    p.add_argument('--json', action='store_true', help='print a JSON list instead of a table')
    p.set_defaults(func=_cmd_params)


def _config_flags(p: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field (``--batch-size`` for ``batch_size``), converting to the field's
    type (:data:`rowcol.apps.config.FIELD_TYPES`); default None = not given."""
    from rowcol.apps.config import FIELD_HELP, FIELD_TYPES
    g = p.add_argument_group('run config (defaults come from --recipe; see rowcol/apps/config.py)')
    for name, (base, _) in FIELD_TYPES.items():
        kw: dict = dict(default=None, help=FIELD_HELP.get(name, ''), dest=name)
        if base is bool:
            kw['action'] = argparse.BooleanOptionalAction
        elif base is dict:
            kw.update(type=json.loads, metavar='JSON')
        else:
            kw.update(type=base, metavar=name.split('_')[-1].upper())
        g.add_argument('--' + name.replace('_', '-'), **kw)


def _overrides(args: argparse.Namespace) -> dict:
    """The config flags given on the command line (typed by argparse)."""
    from rowcol.apps.config import FIELD_TYPES
    return {name: getattr(args, name) for name in FIELD_TYPES if getattr(args, name, None) is not None}


def _cmd_train(args: argparse.Namespace) -> int:
    from rowcol.apps.rundir import load_run_config, resume_config
    from rowcol.apps.train import run_train
    if args.resume:
        cfg, output = resume_config(args.resume, _overrides(args)), args.resume
    else:
        from rowcol.apps.config import resolve_config
        overrides = _overrides(args)
        overrides.pop('recipe', None)
        if overrides.get('init_from'):  # the dense run's architecture, halved
            run = load_run_config(overrides['init_from'])
            overrides.setdefault('halve', True)
            if 'model' not in overrides:
                overrides.update(model=run.model, model_kwargs=overrides.get('model_kwargs', run.model_kwargs))
                if run.img_size is not None:
                    overrides.setdefault('img_size', run.img_size)
        cfg = resolve_config(args.recipe, **overrides)
        output = args.output or f'runs/{cfg.model}{"-halved" if cfg.halve else ""}-s{cfg.seed}'
    return run_train(cfg, output, resume=bool(args.resume), overwrite=args.overwrite, progress=not args.quiet)


def _add_train(sub) -> None:
    p = sub.add_parser('train', help='train any registered model (dense or PE); torchrun for many processes')
    p.add_argument('--output', help='run directory (default: runs/<model>-s<seed>); an existing run is refused')
    p.add_argument('--resume', metavar='RUN_DIR', help='continue the run in RUN_DIR from its last checkpoint')
    p.add_argument('--overwrite', action='store_true', help='replace the run files in --output')
    p.add_argument('--quiet', action='store_true', help='no progress bar')
    _config_flags(p)
    p.set_defaults(func=_cmd_train)


def _cmd_eval(args: argparse.Namespace) -> int:
    from rowcol.apps.evaluate import evaluate_file, evaluate_run
    from rowcol.apps.plots import plot_confusion
    if (args.checkpoint is None) == (args.model is None):
        raise ConfigError('eval: give --checkpoint RUN_DIR, or --model NAME --weights FILE')
    if args.checkpoint is not None:
        weights = args.weights or 'last'
        if weights not in ('last', 'best', 'ema'):
            raise ConfigError(f"eval --checkpoint: --weights must be last, best or ema, got '{weights}' "
                              '(a weights file goes with --model NAME)')
        res = evaluate_run(args.checkpoint, args.data, weights=weights, split=args.split,
                           batch_size=args.batch_size, device=args.device, progress=not args.json)
        default_png = Path(args.checkpoint) / 'confusion.png'
    else:
        if not args.weights:
            raise ConfigError('eval --model: --weights FILE is required (.safetensors, .pth or .pth.tar)')
        res = evaluate_file(args.model, args.weights, args.data, ema=args.ema, batch_size=args.batch_size,
                            img_size=args.img_size, device=args.device, progress=not args.json)
        default_png = None  # nothing is written beside the user's file unless --confusion asks
    classes = list(res['per_class'])
    if args.confusion != '' and (args.confusion or default_png):
        path = args.confusion or str(default_png)
        plot_confusion(res['confusion'], classes, path, title=f"{res['checkpoint']} on {res['data']}")
        res['confusion_png'] = path
    if args.json:
        print(json.dumps(res))
        return 0
    print(f"{res['checkpoint']} ({res['weights']} weights) on {res['data']} [{res['split']}]: "
          f"{res['num_images']} images")
    print(f"top-1 {res['top1']:.2f}%  top-5 {res['top5']:.2f}%  loss {res['loss']:.4f}")
    for c, acc in res['per_class'].items():
        print(f'  {c:>20s} {acc:6.2f}%')
    if 'confusion_png' in res:
        print(f"confusion matrix: {res['confusion_png']}")
    return 0


def _add_eval(sub) -> None:
    p = sub.add_parser('eval', help='top-1/top-5/loss, per-class accuracy and a confusion matrix of a run '
                       'or of a weights file')
    p.add_argument('--checkpoint', metavar='RUN_DIR', help='run directory (rowcol train --output)')
    p.add_argument('--model', metavar='NAME', help='timm model name, scored with --weights FILE')
    p.add_argument('--data', required=True, help="folder of class folders, or 'digits' / 'cifar10' / 'cifar100'")
    p.add_argument('--weights', default=None, help='with --checkpoint: last (default), best or ema; with --model: '
                   "a file (.safetensors, or .pth / .pth.tar such as timm train.py's model_best.pth.tar)")
    p.add_argument('--ema', action='store_true', help="with --model: the file's state_dict_ema")
    p.add_argument('--img-size', type=int, default=None, help="with --model: input size (default: the model's)")
    p.add_argument('--split', default='auto', choices=['auto', 'val', 'all'],
                   help="val: the run's saved validation split of --data (its training data); all: the "
                        "evaluation part of --data (a bare folder: every image; a train/val layout: val/; "
                        "cifar: the test set); auto: val when --data is the run's own training data")
    p.add_argument('--batch-size', type=int, default=256)
    p.add_argument('--device', default=None)
    p.add_argument('--confusion', default=None, metavar='PNG',
                   help="where to write the confusion-matrix PNG (default with --checkpoint: RUN_DIR/confusion.png; "
                        "'' for none)")
    p.add_argument('--json', action='store_true', help='print one JSON object')
    p.set_defaults(func=_cmd_eval)


def _cmd_compare(args: argparse.Namespace) -> int:
    from rowcol.apps.compare import compare, format_report
    from rowcol.apps.config import resolve_config
    overrides = _overrides(args)
    overrides.pop('recipe', None)
    cfg = resolve_config(args.recipe, **overrides)
    output = args.output or f'runs/compare-{cfg.model}-s{cfg.seed}'
    report = compare(cfg, output, dense=args.dense, resume=args.resume, overwrite=args.overwrite,
                     progress=not args.quiet, command='rowcol ' + ' '.join(sys.argv[1:]),
                     resume_overrides={k: v for k, v in _overrides(args).items() if k != 'model'})
    print(format_report(report))
    print(f'report: {output}/report.md')
    return 0


def _add_compare(sub) -> None:
    p = sub.add_parser('compare', help='train a PE model and its dense twin with the same recipe, data and seed')
    p.add_argument('--dense', help='the dense model (default: the PE model\'s registered twin)')
    p.add_argument('--output', help='directory for dense/, pe/ and the report (default runs/compare-<model>-s<seed>)')
    p.add_argument('--resume', action='store_true', help='continue unfinished runs in --output')
    p.add_argument('--overwrite', action='store_true', help='replace the runs in --output')
    p.add_argument('--quiet', action='store_true', help='no progress bar')
    _config_flags(p)
    p.set_defaults(func=_cmd_compare)


def _cmd_demo(args: argparse.Namespace) -> int:
    if args.data:
        args.recipe = args.recipe or 'cifar_vit'
        args.model = args.model or 'vit_pe_nano_patch4_32'
        args.val_split = args.val_split or 0.1
        args.epochs = args.epochs or 2
    else:
        args.recipe = 'digits'
        args.model = args.model or 'vit_pe_micro_patch4_16'
    if args.output is None:  # the demo's own directory is replaced on every demo run
        args.output, args.overwrite = f'runs/demo-{args.model}', True
    return _cmd_compare(args)


def _add_demo(sub) -> None:
    p = sub.add_parser('demo', help='compare on the bundled digits (about two minutes on 2 cores), or on --data')
    p.add_argument('--dense', help=argparse.SUPPRESS)
    p.add_argument('--output', help='directory (default runs/demo-<model>, replaced on each demo run)')
    p.add_argument('--resume', action='store_true', help=argparse.SUPPRESS)
    p.add_argument('--overwrite', action='store_true', help=argparse.SUPPRESS)
    p.add_argument('--quiet', action='store_true', help='no progress bar')
    _config_flags(p)
    p.set_defaults(func=_cmd_demo)


def _add_bench(sub) -> None:
    from rowcol.apps import bench
    p = sub.add_parser('bench', help='img/s, latency and memory of a PE model next to its dense twin')
    bench.add_arguments(p)
    p.set_defaults(func=bench.run)


def _add_export(sub) -> None:
    from rowcol.apps import export
    p = sub.add_parser('export', help='ONNX (each shared W stored once) or safetensors file of a model or run')
    export.add_arguments(p)
    p.set_defaults(func=export.run)


def _cmd_analyze(args: argparse.Namespace) -> int:
    from rowcol.apps.analyze import analyze_run
    from rowcol.apps.plots import plot_analysis
    res = analyze_run(args.checkpoint, args.data, dense_run=args.dense_checkpoint, num_images=args.num_images,
                      device=args.device)
    if args.plot != '':
        res['plot'] = args.plot or str(Path(args.checkpoint) / 'analysis.png')
        plot_analysis(res, res['plot'])
    if args.json:
        print(json.dumps(res))
        return 0
    print(f"{res['model']} ({res['checkpoint']}) on {res['num_images']} images of {res['data']}")
    print(f"{'tied layer':<28} {'W shape':>12} {'outside col(W)':>17} {'sigma_max/min':>14} {'stable rank':>12}"
          f"  dense twin's stable ranks")
    for r in res['layers']:
        sv = r['singular_values']
        frac = '-' if r['outside_fraction'] is None else 'n/a (whole space)' if r['col_space_is_all'] \
            else f"{r['outside_fraction']:.4f}"
        dense = ', '.join(f'{v:.1f}' for v in r['dense_stable_rank'].values())
        print(f"{r['name']:<28} {'x'.join(map(str, r['shape'])):>12} {frac:>17} {sv[0] / max(sv[-1], 1e-12):>14.1f} "
              f"{r['stable_rank']:>12.1f}  {dense}")
    if 'plot' in res:
        print(f"plot: {res['plot']}")
    return 0


def _add_analyze(sub) -> None:
    p = sub.add_parser('analyze', help='how much of what reaches Wᵀ lies outside the column space of W')
    p.add_argument('--checkpoint', required=True, metavar='RUN_DIR', help='a run of a PE model')
    p.add_argument('--data', required=True, help='images to measure on (folder of class folders, digits, cifar10)')
    p.add_argument('--dense-checkpoint', metavar='RUN_DIR', help='a run of the dense twin, for its spectra')
    p.add_argument('--num-images', type=int, default=512)
    p.add_argument('--device', default=None)
    p.add_argument('--plot', default=None, metavar='PNG', help="default RUN_DIR/analysis.png; '' for none")
    p.add_argument('--json', action='store_true')
    p.set_defaults(func=_cmd_analyze)


_SUBCOMMANDS: list[Callable] = [_add_params, _add_train, _add_eval, _add_compare, _add_demo, _add_bench, _add_export,
                                _add_analyze]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='rowcol', description='Parameter-efficient vision models: one W used as W and as Wᵀ.')
    sub = parser.add_subparsers(dest='command', required=True, metavar='<subcommand>')
    for add in _SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except Interrupted as e:
        print(f'rowcol {args.command}: {e}', file=sys.stderr)
        return 128 + e.signum
    except RowcolError as e:
        print(f'rowcol {args.command}: error: {e}', file=sys.stderr)
        return 2


if __name__ == '__main__':
    sys.exit(main())
