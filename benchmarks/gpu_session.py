"""One lent GPU session: the CUDA benches of docs/PERFORMANCE.md and the CIFAR-10 runs of docs/RESULTS.md.

Run from the repository root on a CUDA machine, with the CIFAR-10 folder unpacked somewhere:

    python benchmarks/gpu_session.py bench --out OUT            # rowcol bench, bf16 compiled and eager
    python benchmarks/gpu_session.py bench --out OUT --prewarm 200 --deadline 480  # compile all pairs at once first
    python benchmarks/gpu_session.py profile --out OUT          # top kernels, PE next to dense
    python benchmarks/gpu_session.py train --out OUT --data cifar10/train --jobs 10 --deadline 420 \
        --done results/cifar10                                    # skip runs already there
    python benchmarks/gpu_session.py pack --out OUT --dest FOLDER  # archives of OUT (runs in OUT/runs or OUT/train/runs)
    python benchmarks/gpu_session.py train --out OUT --data DIR --runs benchmarks/plans/vit_gap.json  # another plan

``bench`` measures the three models of the speed target (PE vs dense twin, interleaved, in one process
each) and writes one JSON file per measurement. ``train`` runs the protocol's training runs
(docs/RESULTS.md, same flags as on the CPU), or those of a ``--runs`` plan (a JSON list of [name, flags]),
as ``--jobs`` concurrent processes on the one GPU, in priority order; at ``--deadline`` seconds the unfinished ones get SIGTERM, which makes
``rowcol train`` write a resumable checkpoint, and the next ``train`` call with the same ``--out``
(on the same machine) resumes them. Run directories go to ``OUT/runs/<run>``.
Concurrent runs share the GPU, so their wall times are not single-run costs.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

VIT = ['--recipe', 'cifar_vit', '--epochs', '25']
RES = ['--recipe', 'cifar_resnet', '--epochs', '30', '--amp', 'bf16']


def _run(model: str, seed: int, flags: list[str], tag: str = '', kwargs: dict | None = None) -> tuple[str, list[str]]:
    name = f"{model}{'-' + tag if tag else ''}-s{seed}-h100"
    args = ['--model', model, '--seed', str(seed), *flags]
    if kwargs:
        args += ['--model-kwargs', json.dumps(kwargs)]
    return name, args


# Priority order: main pairs (seeds 0, 1), the rest of the ResNet runs and the ablations, equal
# parameters, then seed 2 of the pairs.
RUNS = [
    _run('vit_nano_patch4_32', 0, VIT), _run('vit_pe_nano_patch4_32', 0, VIT),
    _run('vit_nano_patch4_32', 1, VIT), _run('vit_pe_nano_patch4_32', 1, VIT),
    _run('resnet26_cifar', 0, RES), _run('resnet26_pe_cifar', 0, RES),
    _run('resnet26_cifar', 1, RES), _run('resnet26_pe_cifar', 1, RES),
    _run('resnet26_pe_all_cifar', 0, RES),
    _run('vit_pe_nano_patch4_32', 0, VIT, 'attn_dense', {'attn_form': 'dense'}),
    _run('vit_pe_nano_patch4_32', 0, VIT, 'attn_qk_vo', {'attn_form': 'qk_vo'}),
    _run('vit_pe_nano_patch4_32', 0, VIT, 'attn_vo', {'attn_form': 'vo'}),
    _run('vit_pe_nano_patch4_32', 0, VIT, 'mlp_identity', {'mlp_act': 'identity'}),
    _run('resnet26_pe_cifar', 0, RES, 'tie_block', {'tie': 'block'}),
    _run('resnet26_pe_cifar', 0, RES, 'tie_none', {'tie': 'none'}),  # the layout without the tie
    _run('vit_pe_nano_patch4_32', 0, VIT, 'depth12', {'depth': 12}),
    _run('vit_pe_nano_patch4_32', 0, VIT, 'dim180', {'embed_dim': 180, 'num_heads': 4}),
    _run('vit_nano_patch4_32', 2, VIT), _run('vit_pe_nano_patch4_32', 2, VIT),
    _run('resnet26_cifar', 2, RES), _run('resnet26_pe_cifar', 2, RES),
]

# (file stem, rowcol bench flags); PE model first, its dense twin is --vs.
BENCHES = [
    ('vit_tiny32-infer', ['--model', 'vit_pe_tiny_patch4_32', '--mode', 'infer', '--batch-size', '256']),
    ('vit_tiny32-train', ['--model', 'vit_pe_tiny_patch4_32', '--mode', 'train', '--batch-size', '256']),
    ('vit_s16-infer', ['--model', 'vit_pe_small_patch16_224', '--mode', 'infer', '--batch-size', '128']),
    ('vit_s16-train', ['--model', 'vit_pe_small_patch16_224', '--mode', 'train', '--batch-size', '128']),
    ('r50-infer', ['--model', 'resnet50_pe', '--mode', 'infer', '--batch-size', '128', '--channels-last']),
    ('r50-train', ['--model', 'resnet50_pe', '--mode', 'train', '--batch-size', '128', '--channels-last']),
    ('vit_nano32-train', ['--model', 'vit_pe_nano_patch4_32', '--mode', 'train', '--batch-size', '128']),
    ('r26cifar-train', ['--model', 'resnet26_pe_cifar', '--mode', 'train', '--batch-size', '128', '--channels-last']),
]
TIMING = ['--amp', 'bf16', '--warmup', '3', '--steps', '5', '--repeats', '5', '--latency-iters', '30', '--json']


def _log(msg: str) -> None:
    print(f'[{time.strftime("%H:%M:%S")}] {msg}', flush=True)


def _prewarm(flags_list: list[list[str]], limit: float) -> None:
    """Compile every pair at once (one short untimed ``rowcol bench --compile`` each, concurrently),
    so that the timed runs after it find inductor's on-disk cache of this machine warm: a cold
    compiled pair takes minutes, mostly on the CPU, and the pairs need not wait for each other."""
    short = ['--amp', 'bf16', '--warmup', '1', '--steps', '1', '--repeats', '1', '--latency-iters', '1', '--compile']
    t0 = time.time()
    procs = [subprocess.Popen([sys.executable, '-m', 'rowcol', 'bench', *f, *short],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for f in flags_list]
    for p, f in zip(procs, flags_list):
        try:
            _, err = p.communicate(timeout=max(1.0, limit - (time.time() - t0)))
            _log(f'prewarm {shlex.join(f)}: rc {p.returncode}' + (f'\n{err[-1000:]}' if p.returncode else ''))
        except subprocess.TimeoutExpired:
            p.kill()
            p.communicate()
            _log(f'prewarm {shlex.join(f)}: stopped at {limit:.0f} s')
    _log(f'prewarm done in {time.time() - t0:.0f} s')


def bench(out: Path, budget: float, compile_modes: tuple[bool, ...], only: list[str] | None = None,
          prewarm: float = 0) -> None:
    t0 = time.time()
    table = dict(BENCHES)
    stems = only or [stem for stem, _ in BENCHES]
    if prewarm and True in compile_modes:
        _prewarm([table[s] for s in stems], min(prewarm, budget))
    for compiled in compile_modes:
        for stem in stems:
            flags = table[stem]
            left = budget - (time.time() - t0)
            if left < 20:
                _log(f'skip {stem} compile={compiled}: out of time')
                continue
            cmd = [sys.executable, '-m', 'rowcol', 'bench', *flags, *TIMING] + (['--compile'] if compiled else [])
            name = f"bench-{stem}-bf16{'-compile' if compiled else ''}"  # as benchmarks/perf_tables.py reads
            _log(f'{name}: {shlex.join(cmd[2:])}')
            try:
                p = subprocess.run(cmd, capture_output=True, text=True, timeout=left)  # a cold --compile pair can take minutes
            except subprocess.TimeoutExpired:
                _log(f'{name}: timed out')
                continue
            if p.returncode:
                _log(f'{name}: failed\n{p.stderr[-2000:]}')
                continue
            (out / f'{name}.json').write_text(p.stdout)
            r = json.loads(p.stdout)
            _log(f"{name}: ratio_img_per_s {r.get('ratio_img_per_s')}")


def profile(out: Path, steps: int = 5, only: list[str] | None = None) -> None:
    """Per model pair of BENCHES (bf16): the ops whose time differs most between the PE model and
    its dense twin (benchmarks/profile_pair.py), into profile-<stem>.md."""
    sys.path.insert(0, str(Path(__file__).parent))
    from profile_pair import compare, op_times

    from rowcol.models import dense_twin
    from rowcol.runtime import resolve_device
    dev = resolve_device(None)
    for stem, flags in BENCHES:
        if only and stem not in only:
            continue
        opts = dict(zip(flags[::2], flags[1::2]))
        model, twin = opts['--model'], dense_twin(opts['--model'])
        kw = dict(mode=opts['--mode'], batch_size=int(opts['--batch-size']), amp='bf16',
                  channels_last='--channels-last' in flags, device=dev, steps=steps)
        pe, dense = op_times(model, **kw), op_times(twin, **kw)
        (out / f'profile-{stem}.md').write_text(
            f'{model} vs {twin}, {kw["mode"]}, batch {kw["batch_size"]}, bf16, {dev}, {steps} steps\n\n'
            + compare(pe, dense, rows=30, names=(model, twin)) + '\n')
        _log(f'profile-{stem}.md written')


def _finished(run_dir: Path) -> bool:
    """A run directory whose metrics reach its planned epochs."""
    from rowcol.train import read_metrics
    try:
        return len(read_metrics(run_dir)) >= json.loads((run_dir / 'config.json').read_text())['epochs']
    except (OSError, ValueError, KeyError):
        return False


def train(out: Path, data: str, jobs: int, deadline: float, done: Path | None = None,
          only: list[str] | None = None, runs: list | None = None) -> None:
    """Runs RUNS (or those of them named in ``only``), skipping those finished in ``done`` (e.g.
    results/cifar10) or in ``out``; a run stopped by an earlier call (``train_state.pt`` in
    ``out/runs/<run>``) is resumed."""
    runs_dir = out / 'runs'
    runs_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')
    places = [runs_dir] + ([done] if done else [])  # in done/ also the same run made on the CPU
    runs = runs or RUNS
    queue = [(n, a) for n, a in runs if (not only or n in only)
             and not any(_finished(p / m) for p in places for m in (n, n.removesuffix('-h100')))]
    running, t0, status = {}, time.time(), {}
    _log(f'{len(queue)} of {len(runs)} runs to do')
    while queue or running:
        for name, p in list(running.items()):
            if p.poll() is not None:
                status[name] = dict(rc=p.returncode, seconds=round(time.time() - p.started, 1))
                _log(f'{name}: rc {p.returncode} after {status[name]["seconds"]} s')
                del running[name]
        if time.time() - t0 > deadline:
            for name, p in running.items():
                p.send_signal(signal.SIGTERM)
            grace = time.time() + 60  # for all of them together
            for name, p in running.items():
                try:
                    p.wait(timeout=max(1., grace - time.time()))
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
                status[name] = dict(rc=p.returncode, seconds=round(time.time() - p.started, 1), stopped=True)
                _log(f'{name}: stopped at the deadline (rc {p.returncode})')
            for name, _ in queue:
                status[name] = dict(not_started=True)
            break
        while queue and len(running) < jobs and time.time() - t0 < deadline - 60:  # no start just to stop
            name, args = queue.pop(0)
            if (runs_dir / name / 'train_state.pt').exists():
                cmd = [sys.executable, '-m', 'rowcol', 'train', '--resume', str(runs_dir / name), '--quiet']
            else:  # --overwrite: a run stopped before its first checkpoint starts again
                cmd = [sys.executable, '-m', 'rowcol', 'train', *args, '--data', data, '--val-split', '0.1',
                       '--device', 'cuda', '--output', str(runs_dir / name), '--overwrite', '--quiet']
            _log(f'start {name}: {shlex.join(cmd[2:])}')
            log = open(out / f'{name}.log', 'a')
            p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
            p.started = time.time()
            running[name] = p
        time.sleep(2)
    (out / 'train_status.json').write_text(json.dumps(dict(jobs=jobs, deadline=deadline, runs=status), indent=1))


def pack(work: Path, dest: Path, chunk: int = 15 << 20, runs: list | None = None) -> None:
    """Logs and JSON into dest/meta.tgz; run directories (no best-epoch copy; the resumable state
    only of unfinished runs, last) into dest/runs.tar.00, .01, ... of at most ``chunk`` bytes, in
    RUNS order (``cat runs.tar.* | tar x``). The device returns at most 64 MB: what is over is lost
    from the end, so unfinished runs' states go last."""
    import tarfile
    order = runs
    dest.mkdir(parents=True, exist_ok=True)
    for old in dest.glob('runs.tar.*'):
        old.unlink()
    runs = next((r for r in (work / 'runs', work / 'train' / 'runs') if r.is_dir()), work / 'runs')
    with tarfile.open(dest / 'meta.tgz', 'w:gz') as t:
        for f in sorted(work.rglob('*')):
            if f.is_file() and f.suffix in ('.log', '.json', '.txt') and 'runs' not in f.relative_to(work).parts:
                t.add(f, str(f.relative_to(work)))
    whole = work / 'runs.tar'
    dirs = [runs / name for name, _ in (order or RUNS) if (runs / name).is_dir()]
    _log(f'packing {len(dirs)} run directories from {runs}')
    with tarfile.open(whole, 'w') as t:
        for d in dirs:
            for f in sorted(d.rglob('*')):
                if f.is_file() and f.name not in ('train_state.pt', 'model_best.safetensors'):
                    t.add(f, str(f.relative_to(runs.parent)))
        for d in dirs:
            if not _finished(d) and (d / 'train_state.pt').is_file():
                t.add(d / 'train_state.pt', str((d / 'train_state.pt').relative_to(runs.parent)))
    data = whole.read_bytes()
    for i in range(0, len(data), chunk):
        (dest / f'runs.tar.{i // chunk:02d}').write_bytes(data[i:i + chunk])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('phase', choices=['bench', 'profile', 'train', 'pack'])
    ap.add_argument('--out', type=Path, required=True)
    ap.add_argument('--data', help='CIFAR-10 train folder (train phase)')
    ap.add_argument('--jobs', type=int, default=10, help='concurrent training processes')
    ap.add_argument('--compile', choices=['no', 'yes', 'both'], default='both',
                    help='bench eager, compiled or both (compiled first)')
    ap.add_argument('--prewarm', type=float, default=0, help='bench: seconds (of --deadline) to compile all '
                    'selected pairs concurrently, untimed, before the timed compiled runs')
    ap.add_argument('--dest', type=Path, help='pack: where the archives go')
    ap.add_argument('--only', nargs='+', help='bench: only these BENCHES stems, in the order given; profile: only these '
                    'BENCHES stems; train: only these RUNS names (in the order of RUNS)')
    ap.add_argument('--done', type=Path, help='train: skip runs finished in this results folder (with or '
                    'without the -h100 suffix)')
    ap.add_argument('--deadline', type=float, default=420, help='seconds: bench budget, or when unfinished runs stop')
    ap.add_argument('--runs', type=Path, help='train, pack: a JSON list of [name, [rowcol train flags]] in priority '
                    'order, instead of the built-in RUNS (e.g. benchmarks/runs/vit_gap.json)')
    a = ap.parse_args()
    runs = json.loads(a.runs.read_text()) if a.runs else RUNS
    names = [n for n, _ in runs] if a.phase == 'train' else [stem for stem, _ in BENCHES]
    if a.only and set(a.only) - set(names):
        ap.error(f'--only: no such name {sorted(set(a.only) - set(names))} for {a.phase}; names: {names}')
    a.out.mkdir(parents=True, exist_ok=True)
    if a.phase == 'bench':
        bench(a.out, a.deadline, {'no': (False,), 'yes': (True,), 'both': (True, False)}[a.compile], a.only,
              a.prewarm)
    elif a.phase == 'profile':
        profile(a.out, only=a.only)
    elif a.phase == 'pack':
        if not a.dest:
            ap.error('pack needs --dest')
        pack(a.out, a.dest, runs=runs)
    else:
        if not a.data:
            ap.error('train needs --data')
        train(a.out, a.data, a.jobs, a.deadline, a.done, a.only, runs)


if __name__ == '__main__':
    main()
