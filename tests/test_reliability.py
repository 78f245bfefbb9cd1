"""Issue 17: symlink loops, run-directory locks and markers, divergence, model_kwargs, checksums, EMA."""
import json
import logging
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import rowcol.apps.train as train_mod
from rowcol.apps import checkpoint as ckpt
from rowcol.apps.cli import main
from rowcol.apps.config import resolve_config
from rowcol.apps.data import scan_image_folder
from rowcol.errors import CheckpointError, ConfigError, DataError, NonFiniteLossError, RunExistsError, RunLockedError
from rowcol.apps.rundir import resume_config
from rowcol.apps.train import train

ROOT = Path(__file__).resolve().parents[1]
MODEL = 'vit_pe_micro_patch4_16'


def _cfg(**kw):
    base = dict(model=MODEL, subset=64, batch_size=32, epochs=1, val_split=0.2, seed=3)
    return resolve_config('digits', **{**base, **kw})


def _images(folder: Path, n: int, channel: int = 0) -> None:
    folder.mkdir(parents=True)
    for j in range(n):
        img = np.full((16, 16, 3), 40, dtype=np.uint8)
        img[..., channel] = 200
        Image.fromarray(img).save(folder / f'{j:03d}.png')


# ---------------------------------------------------------------------------- 1. symlinks

def test_links_out_of_a_class_folder_or_back_into_it_are_not_followed(tmp_path, caplog):
    root = tmp_path / 'L'
    _images(root / 'cat', 20)
    _images(root / 'dog', 20, channel=1)
    os.symlink('..', root / 'cat' / 'loop')  # the dataset root: every class, again and again
    _images(root / 'dog' / 'pups', 3, channel=1)
    os.symlink('pups', root / 'dog' / 'again')  # a folder already scanned
    with caplog.at_level(logging.WARNING, logger='rowcol.apps.data'):
        samples = scan_image_folder(root)
    assert samples.labels.count(0) == 20 and samples.labels.count(1) == 23
    assert not any('loop' in p or 'again' in p for p in samples.paths)
    assert 'loop' in caplog.text and 'again' in caplog.text


def test_a_link_is_followed_only_to_a_new_folder_inside_its_class_folder(tmp_path, caplog):
    root = tmp_path / 'L'
    _images(root / 'a', 4)
    _images(root / 'b', 4, channel=1)
    _images(tmp_path / 'kept' / 'x', 2)
    os.symlink(tmp_path / 'kept', root / 'b' / 'extra')  # outside the class folder
    os.symlink('../a', root / 'b' / 'as')  # another class
    (root / 'a' / 'more').mkdir()
    _images(root / 'a' / 'more' / 'deep', 2)
    os.symlink('more/deep', root / 'a' / 'shortcut')  # inside, but reached twice: once only
    with caplog.at_level(logging.WARNING, logger='rowcol.apps.data'):
        samples = scan_image_folder(root)
    assert samples.labels.count(0) == 6 and samples.labels.count(1) == 4
    assert 'extra' in caplog.text and 'b/as' in caplog.text and 'shortcut' in caplog.text


# ---------------------------------------------------------------------------- 2, 3. leftovers, locks

def test_leftover_temp_files_are_removed_and_metrics_cut_to_the_checkpoint(tmp_path):
    out = tmp_path / 'run'
    train(_cfg(epochs=2, max_steps=1), out, progress=False)
    (out / '.model_best.safetensors.abc123.tmp').write_bytes(b'')  # a write killed halfway
    (out / '.notes.tmp').write_text('mine')  # not rowcol's
    rows = [{'epoch': 1, 'step': 2, 'train_loss': -1.0}, {'epoch': 2, 'step': 4, 'train_loss': -1.0}]
    (out / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))  # no checkpoint holds these
    train(resume_config(out, {'max_steps': 0}), out, resume=True, progress=False)
    assert not (out / '.model_best.safetensors.abc123.tmp').exists() and (out / '.notes.tmp').exists()
    rows = [json.loads(r) for r in (out / 'metrics.jsonl').read_text().splitlines()]
    assert [r['epoch'] for r in rows] == [1, 2] and all(r['train_loss'] > 0 for r in rows)  # redone, not kept


_HOLD = '''
import sys, time
from rowcol.apps.checkpoint import RunLock
RunLock(sys.argv[1]).acquire()
print('locked', flush=True)
time.sleep(120)
'''


def test_a_second_process_is_refused_and_a_dead_holders_lock_is_taken_over(tmp_path, capsys):
    out = tmp_path / 'run'
    train(_cfg(epochs=2, max_steps=1), out, progress=False)
    holder = subprocess.Popen([sys.executable, '-c', _HOLD, str(out)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, 'PYTHONPATH': str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == 'locked'
        before = ckpt.load_state(out / ckpt.STATE)['loop']['step']
        with pytest.raises(RunLockedError, match=f'pid {holder.pid} '):
            train(resume_config(out, {'max_steps': 2}), out, resume=True, progress=False)
        assert main(['train', '--resume', str(out), '--max-steps', '2', '--quiet']) == 2
        assert f'pid {holder.pid}' in capsys.readouterr().err
        assert ckpt.load_state(out / ckpt.STATE)['loop']['step'] == before  # nothing written
    finally:
        holder.kill()
        holder.wait()
    res = train(resume_config(out, {'max_steps': 2}), out, resume=True, progress=False)  # the holder died: stale
    assert len(res.step_losses) == 1
    assert f'took over the lock left by pid {holder.pid}' in capsys.readouterr().err
    assert (out / ckpt.LOCK).read_text() == ''


# ---------------------------------------------------------------------------- 4. --overwrite

def test_overwrite_refuses_a_folder_rowcol_did_not_make(tmp_path):
    out = tmp_path / 'mine'
    out.mkdir()
    mine = {'config.json': '{"my": "settings"}', 'metrics.jsonl': '{"my": 1}\n', 'curves.png': 'my plot'}
    for name, text in mine.items():
        (out / name).write_text(text)
    for overwrite in (False, True):
        with pytest.raises(RunExistsError, match='not a rowcol run directory') as e:
            train(_cfg(max_steps=1), out, overwrite=overwrite, progress=False)
        assert 'holds a run' not in str(e.value)
    assert {p.name: p.read_text() for p in out.iterdir()} == mine


def test_suggested_commands_quote_paths_with_spaces(tmp_path, capsys):
    out = tmp_path / 'my runs' / 'run 1'
    assert main(['train', '--recipe', 'digits', '--model', MODEL, '--subset', '64', '--max-steps', '1',
                 '--output', str(out), '--quiet']) == 0
    assert f'--resume {shlex.quote(str(out))} ' in capsys.readouterr().out
    assert main(['train', '--recipe', 'digits', '--model', MODEL, '--output', str(out), '--quiet']) == 2
    assert f'--resume {shlex.quote(str(out))} ' in capsys.readouterr().err


# ---------------------------------------------------------------------------- 5. divergence

def test_nan_before_the_first_checkpoint_names_the_command_that_restarts(tmp_path, monkeypatch, capsys):
    out = tmp_path / 'run'
    real = train_mod.compute_loss
    monkeypatch.setattr(train_mod, 'compute_loss', lambda *a: real(*a) * float('nan'))
    with pytest.raises(NonFiniteLossError, match='nothing to resume') as e:
        train(_cfg(max_nonfinite=2), out, progress=False)
    command = str(e.value).split('lower learning rate: ')[1].split(' (or with')[0]
    with pytest.raises(RunExistsError, match='--overwrite') as again:  # the same command
        train(_cfg(max_nonfinite=2), out, progress=False)
    assert '--resume' not in str(again.value)
    with pytest.raises(CheckpointError, match='--overwrite'):
        train(_cfg(max_nonfinite=2), out, resume=True, progress=False)
    monkeypatch.setattr(train_mod, 'compute_loss', real)
    args = shlex.split(command)
    assert args[:2] == ['rowcol', 'train'] and '--overwrite' in args and '--lr' in args
    assert main(args[1:] + ['--quiet']) == 0  # the command, as printed, restarts the run
    capsys.readouterr()
    assert json.loads((out / 'config.json').read_text())['lr'] == pytest.approx(_cfg().scaled_lr() / 2, rel=1e-2)


def test_save_every_step_never_keeps_weights_that_then_diverged(tmp_path, monkeypatch):
    kw = dict(epochs=2, subset=256, save_every_steps=1, max_nonfinite=2, opt='sgd', lr=0.1)
    train(_cfg(max_steps=2, **kw), tmp_path / 'two', progress=False)  # weights after 2 good steps
    real, calls = train_mod.compute_loss, []

    def blow_up(*a):  # step 3: a finite loss whose step wrecks the weights; then nothing but NaN
        calls.append(1)
        loss = real(*a)
        return loss * 1e12 if len(calls) == 3 else loss * float('nan') if len(calls) > 3 else loss
    monkeypatch.setattr(train_mod, 'compute_loss', blow_up)
    out = tmp_path / 'run'
    with pytest.raises(NonFiniteLossError, match='--resume') as e:
        train(_cfg(**kw), out, progress=False)
    assert '--max-nonfinite' in str(e.value) and '--overwrite' in str(e.value)
    good, saved = load_file(tmp_path / 'two' / ckpt.WEIGHTS), load_file(out / ckpt.WEIGHTS)
    assert all(torch.equal(good[k], saved[k]) for k in good)
    state = ckpt.load_state(out / ckpt.STATE)
    assert state['loop']['step'] == 2 and max(v.abs().max().item() for v in state['model'].values()) < 100


class _InfGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float('inf')


def test_a_step_with_a_finite_loss_but_an_infinite_gradient_is_skipped(tmp_path, monkeypatch):
    real, calls = train_mod.compute_loss, []

    def inf_grad_first(*a):
        calls.append(1)
        loss = real(*a)
        return _InfGrad.apply(loss) if len(calls) == 1 else loss
    monkeypatch.setattr(train_mod, 'compute_loss', inf_grad_first)
    res = train(_cfg(epochs=2, max_steps=2), tmp_path / 'run', progress=False)
    assert all(np.isfinite(res.step_losses))
    weights = load_file(tmp_path / 'run' / ckpt.WEIGHTS)
    assert all(torch.isfinite(v).all() for v in weights.values())


# ---------------------------------------------------------------------------- 6. model_kwargs

@pytest.mark.parametrize('key', ['checkpoint_path', 'pretrained', 'pretrained_cfg_overlay', 'features_only'])
def test_model_kwargs_outside_the_documented_list_are_refused(key):
    with pytest.raises(ConfigError, match=key):
        resolve_config('digits', model=MODEL, model_kwargs={key: 'evil.pth'})


def test_a_run_config_with_checkpoint_path_is_refused_by_eval(tmp_path, capsys, monkeypatch):
    out = tmp_path / 'run'
    train(_cfg(max_steps=1), out, progress=False)
    config = json.loads((out / 'config.json').read_text())
    config['model_kwargs'] = {'checkpoint_path': str(tmp_path / 'evil.pth')}
    (out / 'config.json').write_text(json.dumps(config))
    monkeypatch.setattr(torch, 'load', lambda *a, **k: pytest.fail('torch.load reached'))
    with pytest.raises(CheckpointError, match='checkpoint_path'):
        ckpt.load_run(out)
    assert main(['eval', '--checkpoint', str(out), '--data', 'digits']) == 2
    err = capsys.readouterr().err
    assert err.startswith('rowcol eval: error: ') and 'checkpoint_path' in err and 'Traceback' not in err
    assert main(['train', '--model', MODEL, '--model-kwargs', '{"pretrained": true}', '--output',
                 str(tmp_path / 'r2'), '--quiet']) == 2
    assert 'pretrained' in capsys.readouterr().err


def test_documented_model_kwargs_still_build(tmp_path):
    cfg = _cfg(max_steps=1, model_kwargs={'depth': 2, 'attn_form': 'vo', 'use_scale': True})
    train(cfg, tmp_path / 'run', progress=False)
    model, _ = ckpt.load_run(tmp_path / 'run')
    assert len(model.blocks) == 2


# ---------------------------------------------------------------------------- 7. smaller

def test_a_single_class_dataset_is_refused(tmp_path, capsys):
    _images(tmp_path / 'one' / 'cat', 8)
    with pytest.raises(DataError, match='one class'):
        train(_cfg(data=str(tmp_path / 'one'), subset=None, batch_size=4, val_split=None), tmp_path / 'r',
              progress=False)
    assert main(['train', '--model', MODEL, '--data', str(tmp_path / 'one'), '--output', str(tmp_path / 'r'),
                 '--quiet']) == 2
    assert 'one class' in capsys.readouterr().err


def test_ema_copies_the_weights_on_the_first_update_only(tmp_path):
    train(_cfg(epochs=2, max_steps=1, ema_decay=0.9), tmp_path / 'one', progress=False)
    train(_cfg(epochs=2, max_steps=2, ema_decay=0.9), tmp_path / 'two', progress=False)
    w1, ema1 = load_file(tmp_path / 'one' / ckpt.WEIGHTS), load_file(tmp_path / 'one' / ckpt.EMA)
    w2, ema2 = load_file(tmp_path / 'two' / ckpt.WEIGHTS), load_file(tmp_path / 'two' / ckpt.EMA)
    assert all(torch.equal(w1[k], ema1[k]) for k in w1)  # update 1 copies
    for k in w2:  # update 2 averages: 0.9 of the copy, 0.1 of the new weights
        torch.testing.assert_close(ema2[k], 0.9 * w1[k] + 0.1 * w2[k])
    assert any(not torch.equal(w2[k], ema2[k]) for k in w2)


def test_a_weights_file_with_a_flipped_byte_is_refused(tmp_path, capsys):
    out = tmp_path / 'run'
    train(_cfg(max_steps=1), out, progress=False)
    assert ckpt.load_run(out)  # intact: loads
    path = out / ckpt.WEIGHTS
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0x10  # in the last tensor's data, not the header
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match='checksum'):
        ckpt.load_run(out)
    assert main(['eval', '--checkpoint', str(out), '--data', 'digits', '--json']) == 2
    assert 'checksum' in capsys.readouterr().err
