"""Markdown tables for docs/PERFORMANCE.md from the JSON of benchmarks/performance.sh or speed_table.py.

    python benchmarks/perf_tables.py docs/perf/cpu-392d8aa   # bench-*.json, loop-*.json, export-*.json of a folder
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def _mb(b: float) -> str:
    return f'{b / 2 ** 20:.1f}'


def _pair_spread(pe: dict, de: dict) -> str:
    """min-max over trials of PE img/s / dense img/s, trial i of each (run next to each other)."""
    if not pe.get('trials') or len(pe['trials']) != len(de.get('trials') or ()):
        return '-'
    ratios = [a / b for a, b in zip(pe['trials'], de['trials'])]
    return f'{min(ratios):.2f}-{max(ratios):.2f}'


def bench_table(d: Path) -> str:
    rows = [json.loads(f.read_text()) for f in sorted(d.glob('bench-*.json'))]
    compiled = any(r.get('compile') for r in rows)  # a compile column only where some row is compiled
    head = ['model', 'vs', 'mode', 'amp'] + ['compile'] * compiled + [
        'batch', 'trials × steps', 'model img/s', 'vs img/s', 'model/vs', 'model/vs per trial pair (min-max)',
        'batch-1 latency p50, model / vs (ms)', 'peak MB, model / vs']
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for r in rows:
        pe, de = r['results'][r['model']], r['results'][r['vs']]
        lat = (f"{pe['latency_p50_ms']:.1f} / {de['latency_p50_ms']:.1f}" if pe.get('latency_p50_ms') else '-')
        cells = [r['model'], r['vs'], r['mode'], r['amp'] or 'fp32'] + ['yes' if r.get('compile') else 'no'] * compiled + [
            r['batch_size'], f"{r['repeats']} × {r['steps']}", f"{pe['img_per_s']:.1f}", f"{de['img_per_s']:.1f}",
            f"**{r['ratio_img_per_s']:.3f}**", _pair_spread(pe, de), lat,
            f"{_mb(pe['peak_mem_bytes'])} / {_mb(de['peak_mem_bytes'])}"]
        lines.append('| ' + ' | '.join(map(str, cells)) + ' |')
    return '\n'.join(lines)


def loop_table(d: Path) -> str:
    lines = ['| model | rowcol loop img/s | timm-style step img/s | rowcol/timm | data only img/s |', '|---|---|---|---|---|']
    for f in sorted(d.glob('loop-*.json')):
        r = json.loads(f.read_text())
        s = r['img_per_s']
        lines.append(f"| {r['model']} | {s['rowcol']:.1f} | {s['timm']:.1f} | **{r['ratio_rowcol_over_timm']:.3f}** | "
                     f"{s['data']:.0f} |")
    return '\n'.join(lines)


def export_table(d: Path) -> str:
    rows = {json.loads(f.read_text())['model']: json.loads(f.read_text()) for f in sorted(d.glob('export-*.json'))}
    lines = ['| model | params | params × 4 (MB) | ONNX file (MB) | file / (params × 4) | copies per tied W |',
             '|---|---|---|---|---|---|']
    for name, r in rows.items():
        tied = r.get('tied') or {}
        copies = max(tied.values()) if isinstance(tied, dict) and tied else '-'
        lines.append(f"| {name} | {r['params']:,} | {_mb(r['params_bytes_ref'])} | {_mb(r['bytes'])} | "
                     f"{r['bytes'] / r['params_bytes_ref']:.3f} | {copies} |")
    return '\n'.join(lines)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    d = Path(args[0] if args else 'docs/perf')
    print(bench_table(d), '', loop_table(d), '', export_table(d), sep='\n')


if __name__ == '__main__':
    main()
