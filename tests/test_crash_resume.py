"""A kill at any point of a checkpoint write, then a resume, ends where an uninterrupted run ends.

Each run executes in a child forked from a server that has imported rowcol once (the
multiprocessing 'forkserver'), so a child starts in milliseconds. A child is killed with
``os._exit`` (no cleanup, no ``finally``: what ``kill -9`` leaves) at the N-th file that
:func:`rowcol.apps.checkpoint.atomic_write` writes into the run directory, at one of three moments:

* ``empty``: the temporary file exists, 0 bytes;
* ``written``: the temporary file is written, not yet renamed into place;
* ``renamed``: the file is in place, the next file of the checkpoint is not.

A second child then continues the run as its messages say: ``--resume`` when a checkpoint
exists, else the same command with ``--overwrite``. Metrics, weights (last, best, EMA) and the
loop state must equal an uninterrupted run's, with no temporary file left. For speed the
children skip ``fsync`` (a killed process loses nothing the kernel holds; only a power cut
would) and write curves.png as a small file, still through ``atomic_write`` at its place.
"""
import json
import multiprocessing
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from rowcol.apps import checkpoint as ckpt
from rowcol.apps.plots import read_metrics

TIMING = ('seconds', 'img_per_s', 'eval_seconds')


def _folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for i, c in enumerate(('a', 'b')):
        (root / c).mkdir(parents=True)
        for j in range(12):
            img = rng.integers(0, 60, (16, 16, 3), dtype=np.uint8)
            img[..., i] += 150
            Image.fromarray(img).save(root / c / f'{j:02d}.png')
    return root


def _child(out: str, data: str, mode: str, at: int, count_file: str) -> None:
    """Train (or continue) the run ``out``; with ``mode``, die at the ``at``-th write into it."""
    import rowcol.apps.rundir as rundir_mod
    from rowcol.apps.config import resolve_config
    from rowcol.apps.rundir import resume_config
    from rowcol.apps.train import train

    writes = [0, 0]  # temp files made, files renamed into place

    def ours(path) -> bool:
        return Path(path).resolve().parent == Path(out).resolve()

    real_mkstemp, real_replace = tempfile.mkstemp, os.replace

    def mkstemp(*args, **kw):
        made = real_mkstemp(*args, **kw)
        if ours(made[1]):
            writes[0] += 1
            if mode == 'empty' and writes[0] == at:
                os._exit(137)
        return made

    def replace(src, dst):
        hit = ours(dst) and writes[1] + 1 == at
        if ours(dst):
            writes[1] += 1
        if mode == 'written' and hit:
            os._exit(137)
        real_replace(src, dst)
        if mode == 'renamed' and hit:
            os._exit(137)

    torch.set_num_threads(1)  # two busy threads per child crawl on a shared 2-core machine
    tempfile.mkstemp, os.replace, os.fsync = mkstemp, replace, lambda fd: None
    rundir_mod.plot_curves = lambda path, runs: ckpt.atomic_write(path,
                                                                  lambda tmp: Path(tmp).write_text(json.dumps(runs)))
    run = Path(out)
    if (run / ckpt.STATE).is_file():
        train(resume_config(run, {}), run, resume=True, progress=False)
    else:  # no checkpoint: what the messages say, the same command with --overwrite
        cfg = resolve_config('digits', model='vit_pe_micro_patch4_16', data=data, batch_size=8, epochs=2,
                             val_split=0.25, seed=3, save_every_steps=1, ema_decay=0.9, model_kwargs={'depth': 1})
        train(cfg, run, overwrite=run.exists(), progress=False)
    Path(count_file).write_text(str(writes[1]))
    os._exit(0)


def _outcome(run: Path) -> tuple:
    rows = [{k: v for k, v in r.items() if k not in TIMING} for r in read_metrics(run)]
    weights = {name: load_file(run / name) for name in (ckpt.WEIGHTS, ckpt.BEST, ckpt.EMA)}
    loop = {k: v for k, v in torch.load(run / ckpt.STATE, weights_only=True)['loop'].items() if k != 'seconds'}
    return rows, weights, loop


@pytest.mark.slow
def test_a_kill_anywhere_in_a_checkpoint_then_resume_ends_like_an_uninterrupted_run(tmp_path):
    ctx = multiprocessing.get_context('forkserver')
    ctx.set_forkserver_preload(['rowcol.apps.train', 'matplotlib.figure', 'matplotlib.backends.backend_agg'])
    data, count = str(_folder(tmp_path / 'imgs')), str(tmp_path / 'count')

    def run(out: Path, mode: str = '', at: int = 0) -> int:
        p = ctx.Process(target=_child, args=(str(out), data, mode, at, count))
        p.start()
        p.join(120)
        return p.exitcode

    assert run(tmp_path / 'ref') == 0
    total = int(Path(count).read_text())  # marker, config, split, then 2 checkpoints per epoch
    assert total >= 15
    rows, weights, loop = _outcome(tmp_path / 'ref')
    assert [r['epoch'] for r in rows] == [1, 2] and loop['epoch'] == 2

    points = [('renamed', n) for n in range(1, total + 1)]
    points += [('written', n) for n in range(2, total + 1, 4)] + [('empty', n) for n in range(3, total + 1, 6)]
    for mode, n in points:
        out = tmp_path / f'{mode}-{n}'
        assert run(out, mode, n) == 137, (mode, n)
        assert run(out) == 0, (mode, n)
        got_rows, got_weights, got_loop = _outcome(out)
        assert got_rows == rows, (mode, n)
        assert got_loop == loop, (mode, n)
        for name, tensors in weights.items():
            assert all(torch.equal(tensors[k], got_weights[name][k]) for k in tensors), (mode, n, name)
        assert not [p.name for p in out.iterdir() if p.name.endswith('.tmp')], (mode, n)
        assert (out / ckpt.LOCK).read_text() == '', (mode, n)  # released
