"""Tables for the command line and the reports: params and MACs, PE next to dense."""
from __future__ import annotations

from typing import Sequence

import rowcol  # noqa: F401  (registers models)
from rowcol.halve import halve
from rowcol.models import create_model, dense_twin, pe_models
from rowcol.stats import count_macs, count_params, input_size_of

__all__ = ['param_rows', 'format_table']


def _build(name: str, num_classes: int | None, img_size: int | None):
    return create_model(name, img_size=img_size, **({} if num_classes is None else {'num_classes': num_classes}))


def _measure(model, img_size: int | None) -> tuple[int, int]:
    return count_params(model), count_macs(model, input_size_of(model, img_size))


def param_rows(models: Sequence[str] | None = None, num_classes: int | None = None,
               img_size: int | None = None, halve_attn: str | None = None) -> list[dict]:
    """One dict per model: model, params, dense, dense_params, ratio, macs, dense_macs.

    With ``halve_attn`` (a form, or 'dense'), each model is a dense timm model measured as it is
    and then halved (:func:`rowcol.halve`); ``left_dense`` lists the pairs halve could not tie.
    """
    rows = []
    for name in models or pe_models():
        model = _build(name, num_classes, img_size)
        if halve_attn is not None:
            dense_params, dense_macs = _measure(model, img_size)
            params, macs = _measure(halve(model, attn=halve_attn), img_size)
            rows.append(dict(model=f'{name} (halved)', params=params, dense=name, dense_params=dense_params,
                             ratio=round(params / dense_params, 4), macs=macs, dense_macs=dense_macs,
                             left_dense=[f"{r['name']}: {r['reason']}" for r in model.halve_report.dense]))
            continue
        params, macs = _measure(model, img_size)
        dense = dense_twin(name)
        dense_params = dense_macs = ratio = None
        if dense:
            dense_params, dense_macs = _measure(_build(dense, num_classes, img_size), img_size)
            ratio = round(params / dense_params, 4)
        rows.append(dict(model=name, params=params, dense=dense, dense_params=dense_params,
                         ratio=ratio, macs=macs, dense_macs=dense_macs))
    return rows


def _fmt(v) -> str:
    if v is None:
        return '-'
    return f'{v:,}' if isinstance(v, int) else str(v)


def format_table(rows: Sequence[dict]) -> str:
    """A markdown table of ``param_rows`` output."""
    head = ['model', 'params', 'dense', 'dense_params', 'ratio', 'macs', 'dense_macs']
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    lines += ['| ' + ' | '.join(_fmt(r[k]) for k in head) + ' |' for r in rows]
    left = [f"{r['dense']}: left dense: {item}" for r in rows for item in r.get('left_dense') or []]
    return '\n'.join(lines + left)
