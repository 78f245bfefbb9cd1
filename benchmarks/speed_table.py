"""The PE-vs-dense speed table: ``rowcol bench`` on each model pair of PAIRS, on the device present.

Run from the repository root:

    python benchmarks/speed_table.py --out OUT                     # every pair; table in OUT/table.md
    python benchmarks/speed_table.py --out OUT --deadline 540 --prewarm 200  # a lent GPU: one call, < 10 min
    python benchmarks/speed_table.py --out OUT --only r50-train vit_s16-infer --settings bf16
    python benchmarks/speed_table.py --out OUT --profile --only r50-train   # per-op tables instead of timing
    python benchmarks/perf_tables.py OUT                           # the tables again, from OUT's JSON

Each pair (a PE model and its dense twin, ``rowcol bench``'s default ``--vs``) is measured interleaved,
in one ``rowcol bench`` process per setting: on CUDA ``bf16-compile`` then ``bf16`` (eager), on the CPU
``fp32`` then ``bf16`` (``--settings`` picks others). Batches and timing depend on the device (PAIRS,
TIMING). Each measurement goes to ``OUT/bench-<pair>-<setting>.json`` (``rowcol bench --json``); at the
end the table of every ``bench-*.json`` in OUT (benchmarks/perf_tables.py) is printed and written to
``OUT/table.md``. ``--deadline`` is the call's budget in seconds: a measurement with under 20 s left
is skipped, one still running at the deadline is stopped. ``--prewarm S`` first compiles every
selected pair at once, untimed, for at most S of those seconds, so that the timed compiled runs find
inductor's on-disk cache warm (a cold compiled pair takes minutes, mostly on the CPU). ``--profile``
replaces the timing by torch.profiler's per-op times of both models of each pair and eager setting
(benchmarks/profile_pair.py), written to ``OUT/profile-<pair>-<setting>.md``.
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

from perf_tables import bench_table

Pair = tuple[str, list[str], int, int]  # name, rowcol bench flags of the PE model, CUDA batch, CPU batch

# The dense twin of each PE model is its --vs, unless the flags name another.
PAIRS: list[Pair] = [
    ('vit_tiny32-infer', ['--model', 'vit_pe_tiny_patch4_32', '--mode', 'infer'], 256, 64),
    ('vit_tiny32-train', ['--model', 'vit_pe_tiny_patch4_32', '--mode', 'train'], 256, 64),
    ('vit_s16-infer', ['--model', 'vit_pe_small_patch16_224', '--mode', 'infer'], 128, 16),
    ('vit_s16-train', ['--model', 'vit_pe_small_patch16_224', '--mode', 'train'], 128, 16),
    ('r50-infer', ['--model', 'resnet50_pe', '--mode', 'infer', '--channels-last'], 128, 16),
    ('r50-train', ['--model', 'resnet50_pe', '--mode', 'train', '--channels-last'], 128, 16),
    ('r50-untied-train', ['--model', 'resnet50_pe', '--vs', 'resnet50_pe_untied', '--mode', 'train',
                          '--channels-last'], 128, 16),  # the tie alone: the same layout untied
    ('vit_nano32-train', ['--model', 'vit_pe_nano_patch4_32', '--mode', 'train'], 128, 128),
    ('r26cifar-train', ['--model', 'resnet26_pe_cifar', '--mode', 'train', '--channels-last'], 128, 128),
    ('r26cifar-untied-train', ['--model', 'resnet26_pe_cifar', '--vs', 'resnet26_pe_cifar_untied', '--mode', 'train',
                               '--channels-last'], 128, 128),
]
SETTINGS = ('fp32', 'bf16', 'fp32-compile', 'bf16-compile')
DEFAULT_SETTINGS = {'cuda': ['bf16-compile', 'bf16'], 'cpu': ['fp32', 'bf16']}
TIMING = {'cuda': dict(warmup=3, steps=5, repeats=5, latency_iters=30),
          'cpu': dict(warmup=1, steps=3, repeats=5, latency_iters=10)}
MIN_LEFT = 20.  # seconds: no measurement starts with less left


def _log(msg: str) -> None:
    print(f'[{time.strftime("%H:%M:%S")}] {msg}', flush=True)


def bench_cmd(flags: list[str], batch: int, setting: str, device: str, timing: dict[str, int]) -> list[str]:
    """The ``rowcol bench`` command of one pair in one setting (``fp32``, ``bf16``, ``...-compile``)."""
    amp, _, compiled = setting.partition('-')
    return [sys.executable, '-m', 'rowcol', 'bench', *flags, '--batch-size', str(batch), '--device', device,
            *(['--amp', 'bf16'] if amp == 'bf16' else []), *(['--compile'] if compiled else []),
            *[a for k, v in timing.items() for a in (f'--{k.replace("_", "-")}', str(v))], '--json']


def prewarm(cmds: list[list[str]], limit: float) -> None:
    """Run ``cmds`` (short compiled benches) all at once, untimed, for at most ``limit`` seconds."""
    t0 = time.monotonic()
    procs = [subprocess.Popen(c, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for c in cmds]
    for p, c in zip(procs, cmds):
        try:
            _, err = p.communicate(timeout=max(1., limit - (time.monotonic() - t0)))
            _log(f'prewarm {shlex.join(c[2:])}: rc {p.returncode}' + (f'\n{err[-1000:]}' if p.returncode else ''))
        except subprocess.TimeoutExpired:
            p.kill()
            p.communicate()
            _log(f'prewarm {shlex.join(c[2:])}: stopped at {limit:.0f} s')
    _log(f'prewarm done in {time.monotonic() - t0:.0f} s')


def measure(out: Path, pairs: list[Pair], settings: list[str], device: str, timing: dict[str, int],
            deadline: float | None = None, prewarm_s: float = 0.) -> list[str]:
    """Setting by setting, pair by pair: one ``rowcol bench`` process each, its JSON into
    ``out/bench-<pair>-<setting>.json``; returns the names of the measurements not made."""
    t0, missed = time.monotonic(), []
    batch = {name: gpu if device.startswith('cuda') else cpu for name, _, gpu, cpu in pairs}
    compiled = [s for s in settings if s.endswith('-compile')]
    if prewarm_s and compiled:
        short = dict(warmup=1, steps=1, repeats=1, latency_iters=1)
        prewarm([bench_cmd(f, batch[n], s, device, short) for s in compiled for n, f, *_ in pairs],
                prewarm_s if deadline is None else min(prewarm_s, deadline))
    for setting in settings:
        for name, flags, *_ in pairs:
            stem = f'bench-{name}-{setting}'
            left = float('inf') if deadline is None else deadline - (time.monotonic() - t0)
            if left < MIN_LEFT:
                _log(f'{stem}: skipped, out of time')
                missed.append(stem)
                continue
            cmd = bench_cmd(flags, batch[name], setting, device, timing)
            _log(f'{stem}: {shlex.join(cmd[2:])}')
            try:
                p = subprocess.run(cmd, capture_output=True, text=True, timeout=None if deadline is None else left)
            except subprocess.TimeoutExpired:
                _log(f'{stem}: stopped at the deadline')
                missed.append(stem)
                continue
            if p.returncode:
                _log(f'{stem}: failed\n{p.stderr[-2000:]}')
                missed.append(stem)
                continue
            (out / f'{stem}.json').write_text(p.stdout)
            _log(f"{stem}: model/vs img/s {json.loads(p.stdout).get('ratio_img_per_s')}")
    return missed


def profile(out: Path, pairs: list[Pair], settings: list[str], device: str, warmup: int, steps: int,
            deadline: float | None = None) -> list[str]:
    """Per pair and eager setting, the ops whose time differs most between the PE model and its
    dense twin, into ``out/profile-<pair>-<setting>.md``; returns the names of those not made."""
    import torch
    from profile_pair import compare, op_times

    from rowcol.models import dense_twin
    t0, missed = time.monotonic(), []
    for setting in settings:
        amp, _, compiled = setting.partition('-')
        for name, flags, gpu, cpu in pairs:
            stem = f'profile-{name}-{setting}'
            if compiled or (deadline is not None and deadline - (time.monotonic() - t0) < MIN_LEFT):
                _log(f'{stem}: skipped ({"compiled runs are not profiled" if compiled else "out of time"})')
                missed.append(stem)
                continue
            opts = dict(zip(flags[::2], flags[1::2]))
            model, twin = opts['--model'], dense_twin(opts['--model'])
            kw = dict(mode=opts['--mode'], batch_size=gpu if device.startswith('cuda') else cpu,
                      amp='bf16' if amp == 'bf16' else None, channels_last='--channels-last' in flags,
                      device=torch.device(device), warmup=warmup, steps=steps)
            pe, dense = op_times(model, **kw), op_times(twin, **kw)
            (out / f'{stem}.md').write_text(
                f'{model} vs {twin}, {kw["mode"]}, batch {kw["batch_size"]}, {amp}, {device}, {steps} steps\n\n'
                + compare(pe, dense, rows=30, names=(model, twin)) + '\n')
            _log(f'{stem}.md written')
    return missed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--out', type=Path, required=True, help='folder of the JSON (and profile) files')
    ap.add_argument('--device', help='cuda or cpu (default: cuda if present)')
    ap.add_argument('--settings', nargs='+', choices=SETTINGS, help='default: bf16-compile bf16 on CUDA, '
                    'fp32 bf16 on the CPU')
    ap.add_argument('--only', nargs='+', metavar='PAIR', help='only these pairs, in the order given')
    ap.add_argument('--deadline', type=float, help='seconds for the whole call')
    ap.add_argument('--prewarm', type=float, default=0., help='seconds (of --deadline) to compile all selected '
                    'pairs at once, untimed, before the timed compiled runs')
    ap.add_argument('--profile', action='store_true', help='per-op profiles instead of timing (eager settings)')
    for k in TIMING['cpu']:
        ap.add_argument(f'--{k.replace("_", "-")}', type=int, help=f'rowcol bench --{k.replace("_", "-")} '
                        f'(default: {TIMING["cuda"][k]} on CUDA, {TIMING["cpu"][k]} on the CPU)')
    a = ap.parse_args(argv)
    names = [p[0] for p in PAIRS]
    if a.only and set(a.only) - set(names):
        ap.error(f'--only: no pair {sorted(set(a.only) - set(names))}; pairs: {names}')
    pairs = [next(p for p in PAIRS if p[0] == n) for n in a.only] if a.only else PAIRS
    if a.device is None:
        import torch
        a.device = 'cuda' if torch.cuda.is_available() else 'cpu'
    kind = 'cuda' if a.device.startswith('cuda') else 'cpu'
    settings = a.settings or DEFAULT_SETTINGS[kind]
    timing = {k: v if getattr(a, k) is None else getattr(a, k) for k, v in TIMING[kind].items()}
    a.out.mkdir(parents=True, exist_ok=True)
    if a.profile:
        missed = profile(a.out, pairs, settings, a.device, timing['warmup'], timing['steps'], a.deadline)
    else:
        missed = measure(a.out, pairs, settings, a.device, timing, a.deadline, a.prewarm)
        table = bench_table(a.out)
        (a.out / 'table.md').write_text(table + '\n')
        print(table)
    if missed:
        _log(f'not made: {missed}')
    return 1 if missed else 0


if __name__ == '__main__':
    sys.exit(main())
