"""Run a plan of ``rowcol train`` runs as concurrent processes on one machine, resumably.

Run from the repository root (plans name teachers and init-from runs by paths relative to it):

    python benchmarks/run_experiments.py benchmarks/plans/cifar10_protocol.json --out W --data cifar10/train
    python benchmarks/run_experiments.py PLAN --out W --data DIR --jobs 10 --deadline 420  # SIGTERM at 420 s
    python benchmarks/run_experiments.py PLAN --out W --data DIR       # again: resume the stopped, skip the done
    python benchmarks/run_experiments.py PLAN --out W --data DIR --only NAME NAME --done results/cifar10
    python benchmarks/run_experiments.py PLAN --out W --data DIR --suffix h100   # run directories NAME-h100

A plan is a JSON list of ``[name, [rowcol train flags]]`` in priority order (``benchmarks/plans/``);
``--data`` (and ``--device``) are added to every run. Run NAME goes to ``OUT/NAME``, its output to
``OUT/NAME.log`` (``NAME-SUFFIX`` with ``--suffix``); ``OUT/status.json`` says how each run of the last
call ended. ``--jobs`` runs go at once (they share the machine, so their wall times are not
single-run costs); at ``--deadline`` seconds the unfinished ones get SIGTERM, on which ``rowcol
train`` writes a resumable checkpoint, and a later call with the same ``--out`` continues them with
``rowcol train --resume``. A run is finished when its ``metrics.jsonl`` has the planned epochs; finished
runs, in OUT or in ``--done``, are skipped. Exit status 0 when every selected run is finished.
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
from collections.abc import Callable
from pathlib import Path

GRACE = 60.  # seconds the stopped runs get, all together, to write their checkpoints
MIN_LEFT = 60.  # no run starts with less than this left before the deadline: it would only be stopped

Plan = list[tuple[str, list[str]]]


def _log(msg: str) -> None:
    print(f'[{time.strftime("%H:%M:%S")}] {msg}', flush=True)


def load_plan(path: Path) -> Plan:
    """The runs of a plan file: a JSON list of ``[name, [flags]]`` with distinct names."""
    runs = [(str(name), [str(f) for f in flags]) for name, flags in json.loads(Path(path).read_text())]
    names = [n for n, _ in runs]
    if len(set(names)) != len(names):
        raise ValueError(f'{path}: run names repeat: {sorted({n for n in names if names.count(n) > 1})}')
    return runs


def finished(run_dir: Path) -> bool:
    """Whether ``run_dir``'s metrics reach the epochs of its config."""
    try:
        epochs = json.loads((run_dir / 'config.json').read_text())['epochs']
        rows = [line for line in (run_dir / 'metrics.jsonl').read_text().splitlines() if line.strip()]
    except (OSError, ValueError, KeyError):
        return False
    return len(rows) >= epochs


def run_plan(runs: Plan, out: Path, *, data: str | None = None, device: str | None = None, jobs: int = 1,
             deadline: float | None = None, done: Path | None = None, suffix: str = '', poll: float = 2.,
             min_left: float = MIN_LEFT, clock: Callable[[], float] = time.monotonic) -> dict[str, dict]:
    """Run ``runs`` into ``out`` as described in the module docstring; returns the status of each run
    (also written to ``out/status.json``). ``clock`` gives the seconds that ``deadline`` counts."""
    out.mkdir(parents=True, exist_ok=True)
    dirname = {n: f'{n}-{suffix}' if suffix else n for n, _ in runs}
    status: dict[str, dict] = {}
    queue = []
    for name, flags in runs:
        where = [out / dirname[name]] + ([done / dirname[name], done / name] if done else [])
        hit = next((str(p) for p in where if finished(p)), None)
        if hit:
            status[name] = dict(finished=True, skipped=hit)
        else:
            queue.append((name, flags))
    threads = os.environ.get('OMP_NUM_THREADS') or str(max(1, (os.cpu_count() or 1) // jobs))
    env = dict(os.environ, OMP_NUM_THREADS=threads, PYTHONUNBUFFERED='1')
    dev = ['--device', device] if device else []
    _log(f'{len(queue)} of {len(runs)} runs to do, {jobs} at a time')
    running: dict[str, tuple[subprocess.Popen, float]] = {}
    t0 = clock()

    def left() -> float:
        return float('inf') if deadline is None else deadline - (clock() - t0)

    def ended(name: str, p: subprocess.Popen, started: float, **extra) -> None:
        run_dir = out / dirname[name]
        status[name] = dict(rc=p.returncode, seconds=round(time.monotonic() - started, 1),
                            finished=finished(run_dir), **extra)
        _log(f'{name}: rc {p.returncode}, {"finished" if status[name]["finished"] else "not finished"}'
             + (' (stopped at the deadline)' if extra.get('stopped') else ''))

    while queue or running:
        for name, (p, started) in list(running.items()):
            if p.poll() is not None:
                ended(name, p, started)
                del running[name]
        if left() <= 0:
            for p, _ in running.values():
                p.send_signal(signal.SIGTERM)
            grace = time.monotonic() + GRACE
            for name, (p, started) in running.items():
                try:
                    p.wait(timeout=max(1., grace - time.monotonic()))
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
                ended(name, p, started, stopped=True)
            for name, _ in queue:
                status[name] = dict(finished=False, not_started=True)
            break
        while queue and len(running) < jobs and left() > min_left:
            name, flags = queue.pop(0)
            run_dir = out / dirname[name]
            if (run_dir / 'train_state.pt').exists():
                cmd = ['--resume', str(run_dir), *dev]
            else:  # --overwrite: a run stopped before its first checkpoint starts again
                cmd = [*flags, *(['--data', data] if data else []), *dev, '--output', str(run_dir), '--overwrite']
            cmd = [sys.executable, '-m', 'rowcol', 'train', *cmd, '--quiet']
            _log(f'start {name}: {shlex.join(cmd[2:])}')
            with open(out / f'{dirname[name]}.log', 'a') as log:
                log.write(f'$ {shlex.join(cmd[2:])}\n')
                log.flush()
                running[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env),
                                 time.monotonic())
        if queue and not running:  # too little time left to start any
            for name, _ in queue:
                status[name] = dict(finished=False, not_started=True)
            break
        time.sleep(poll)
    (out / 'status.json').write_text(json.dumps(dict(jobs=jobs, deadline=deadline, runs=status), indent=1))
    return status


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('plan', type=Path, help='JSON list of [name, [rowcol train flags]], in priority order')
    ap.add_argument('--out', type=Path, required=True, help='folder of the run directories and logs')
    ap.add_argument('--data', help='--data of every run (a folder, or digits, cifar10, ...)')
    ap.add_argument('--device', help='--device of every run (default: rowcol train\'s, cuda if present)')
    ap.add_argument('--jobs', type=int, default=1, help='concurrent rowcol train processes')
    ap.add_argument('--deadline', type=float, help='seconds after which unfinished runs get SIGTERM')
    ap.add_argument('--min-left', type=float, default=MIN_LEFT,
                    help='start no run with fewer seconds than this left before --deadline')
    ap.add_argument('--only', nargs='+', metavar='NAME', help='only these runs of the plan (in plan order)')
    ap.add_argument('--done', type=Path, help='skip runs finished in this folder (as NAME or NAME-SUFFIX)')
    ap.add_argument('--suffix', default='', help='tag appended to the run directory names: NAME-SUFFIX')
    a = ap.parse_args(argv)
    runs = load_plan(a.plan)
    if a.only:
        unknown = sorted(set(a.only) - {n for n, _ in runs})
        if unknown:
            ap.error(f'--only: no run {unknown} in {a.plan}; runs: {[n for n, _ in runs]}')
        runs = [(n, f) for n, f in runs if n in a.only]
    status = run_plan(runs, a.out, data=a.data, device=a.device, jobs=a.jobs, deadline=a.deadline,
                      done=a.done, suffix=a.suffix, min_left=a.min_left)
    todo = [n for n, s in status.items() if not s['finished']]
    _log(f'{len(runs) - len(todo)} of {len(runs)} runs finished' + (f'; not finished: {todo}' if todo else ''))
    return 1 if todo else 0


if __name__ == '__main__':
    sys.exit(main())
