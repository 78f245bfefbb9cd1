"""``rowcol <subcommand>``: the command line. Library errors become exit code 2 here, nowhere else."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Callable, Optional, Sequence

from rowcol.errors import RowcolError


def _cmd_params(args: argparse.Namespace) -> int:
    from rowcol.report import format_table, param_rows
    rows = param_rows(args.models or None, num_classes=args.num_classes, img_size=args.img_size)
    print(json.dumps(rows, indent=2) if args.json else format_table(rows))
    return 0


def _add_params(sub) -> None:
    p = sub.add_parser('params', help='parameters and MACs of PE models next to their dense twins')
    p.add_argument('models', nargs='*', metavar='MODEL', help='model names (default: every PE model)')
    p.add_argument('--num-classes', type=int, default=None, help='classifier size (default: the model\'s own)')
    p.add_argument('--img-size', type=int, default=None, help='square input size (default: the model\'s own)')
    p.add_argument('--json', action='store_true', help='print a JSON list instead of a table')
    p.set_defaults(func=_cmd_params)


_SUBCOMMANDS: list[Callable] = [_add_params]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='rowcol', description='Parameter-efficient vision models: one W used as W and as Wᵀ.')
    sub = parser.add_subparsers(dest='command', required=True, metavar='<subcommand>')
    for add in _SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except RowcolError as e:
        print(f'rowcol {args.command}: error: {e}', file=sys.stderr)
        return 2


if __name__ == '__main__':
    sys.exit(main())
