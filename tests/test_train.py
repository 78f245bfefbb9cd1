"""Training loop: exact resume, run-directory safety, non-finite losses, signals, EMA, optimizer groups; configs."""
import copy
import dataclasses
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from timm.optim import create_optimizer_v2
from timm.utils import ModelEmaV3

import rowcol.apps.train as train_mod
from rowcol.apps.config import TrainConfig, config_from_dict, resolve_config
from rowcol.errors import CheckpointError, ConfigError, NonFiniteLossError, RunExistsError
from rowcol.layers import tied_modules
from rowcol.models import create_model
from rowcol.stats import count_params
from rowcol.apps.rundir import resume_config
from rowcol.apps.train import train

ROOT = Path(__file__).resolve().parents[1]
MODEL = 'vit_pe_micro_patch4_16'


def _cfg(**kw):
    base = dict(model=MODEL, subset=256, batch_size=32, epochs=2, val_split=0.2, seed=3)
    return resolve_config('digits', **{**base, **kw})


def _digest(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_resume_mid_epoch_is_bit_identical(tmp_path):
    # a subset of 256 training images (after the 20% validation split): 8 steps per epoch, 16 in all
    straight = train(_cfg(), tmp_path / 'a', progress=False)
    assert straight.status == 'finished' and len(straight.step_losses) == 16
    first = train(_cfg(max_steps=5), tmp_path / 'b', progress=False)
    assert first.status == 'stopped' and len(first.step_losses) == 5
    cfg = resume_config(tmp_path / 'b', {'max_steps': None})
    cfg.max_steps = None
    rest = train(cfg, tmp_path / 'b', resume=True, progress=False)
    assert first.step_losses + rest.step_losses == straight.step_losses  # bit-identical
    a, b = load_file(tmp_path / 'a' / 'model.safetensors'), load_file(tmp_path / 'b' / 'model.safetensors')
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows_a = (tmp_path / 'a' / 'metrics.jsonl').read_text().splitlines()
    rows_b = (tmp_path / 'b' / 'metrics.jsonl').read_text().splitlines()
    assert [json.loads(r)['val_top1'] for r in rows_a] == [json.loads(r)['val_top1'] for r in rows_b]


def test_run_directory_contents(tmp_path):
    out = tmp_path / 'run'
    train(_cfg(epochs=1, ema_decay=0.9), out, progress=False)
    names = {p.name for p in out.iterdir()}
    assert {'config.json', 'model.safetensors', 'model_best.safetensors', 'model_ema.safetensors',
            'train_state.pt', 'metrics.jsonl', 'curves.png', 'split.json'} <= names
    assert not [n for n in names if n.endswith('.tmp')]
    row = json.loads((out / 'metrics.jsonl').read_text())
    assert {'train_loss', 'val_loss', 'val_top1', 'val_top5', 'img_per_s', 'lr', 'seconds'} <= set(row)
    state = torch.load(out / 'train_state.pt', weights_only=True)
    assert state['loop']['epoch'] == 1
    config = json.loads((out / 'config.json').read_text())
    assert config['model'] == MODEL and config['classes'] == [str(i) for i in range(10)]


def test_existing_run_is_refused_and_overwrite_keeps_user_files(tmp_path):
    out = tmp_path / 'run'
    train(_cfg(max_steps=1), out, progress=False)
    before = _digest(out / 'model.safetensors')
    with pytest.raises(RunExistsError, match='--resume'):
        train(_cfg(max_steps=1), out, progress=False)
    assert _digest(out / 'model.safetensors') == before
    (out / 'notes.txt').write_text('mine')
    train(_cfg(max_steps=1, seed=4), out, overwrite=True, progress=False)
    assert (out / 'notes.txt').read_text() == 'mine'
    with pytest.raises(CheckpointError, match='nothing to resume'):
        train(_cfg(), tmp_path / 'empty', resume=True, progress=False)


def test_resume_refuses_changed_recipe(tmp_path):
    train(_cfg(max_steps=1), tmp_path / 'r', progress=False)
    with pytest.raises(ConfigError, match='cannot change on --resume'):
        resume_config(tmp_path / 'r', {'lr': 1.0})
    assert resume_config(tmp_path / 'r', {'epochs': 5}).epochs == 5


def test_nonfinite_losses_abort_and_keep_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / 'run'
    train(_cfg(max_steps=3), out, progress=False)
    good = _digest(out / 'model.safetensors'), _digest(out / 'train_state.pt')
    real = train_mod.compute_loss
    monkeypatch.setattr(train_mod, 'compute_loss', lambda *a: real(*a) * float('nan'))
    cfg = resume_config(out, {'max_steps': 100, 'max_nonfinite': 2})
    with pytest.raises(NonFiniteLossError, match='2 non-finite losses in a row'):
        train(cfg, out, resume=True, progress=False)
    assert (_digest(out / 'model.safetensors'), _digest(out / 'train_state.pt')) == good


def test_single_nonfinite_step_is_skipped(tmp_path, monkeypatch):
    real, calls = train_mod.compute_loss, []

    def flaky(*a):
        calls.append(1)
        loss = real(*a)
        return loss * float('inf') if len(calls) == 2 else loss
    monkeypatch.setattr(train_mod, 'compute_loss', flaky)
    res = train(_cfg(epochs=1), tmp_path / 'run', progress=False)
    assert res.status == 'finished' and not torch.isfinite(torch.tensor(res.step_losses[1]))
    assert all(torch.isfinite(torch.tensor(res.step_losses[i])) for i in (0, 2, 3))


def test_sigterm_writes_resumable_checkpoint(tmp_path):
    out = tmp_path / 'run'
    env = {**os.environ, 'PYTHONPATH': str(ROOT)}
    proc = subprocess.Popen([sys.executable, '-m', 'rowcol', 'train', '--recipe', 'digits', '--model', MODEL,
                             '--epochs', '200', '--output', str(out), '--quiet'],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not (out / 'config.json').exists() and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(1.5)
    proc.send_signal(signal.SIGTERM)
    text, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, text
    assert 'rowcol train --resume' in text and 'Traceback' not in text
    state = torch.load(out / 'train_state.pt', weights_only=True)
    assert state['loop']['step'] > 0
    resumed = train(resume_config(out, {'max_steps': state['loop']['step'] + 2}), out, resume=True, progress=False)
    assert resumed.status == 'stopped' and len(resumed.step_losses) == 2


def test_ema_averages_a_shared_w_once():
    model = create_model(MODEL)
    ema = ModelEmaV3(model, decay=0.9, exclude_buffers=True)
    w = tied_modules(model)[0][1].weight
    w0 = w.detach().clone()
    with torch.no_grad():
        w.add_(1.0)
    ema.update(model, step=10)  # past ModelEmaV3's first steps, which copy
    w_ema = tied_modules(ema.module)[0][1].weight
    torch.testing.assert_close(w_ema, 0.9 * w0 + 0.1 * (w0 + 1.0))  # not 0.9 ** uses


def test_optimizer_groups_hold_each_parameter_once():
    model = create_model('resnet26_pe_cifar')
    opt = create_optimizer_v2(model, opt='adamw', lr=1e-3, weight_decay=0.05)
    ids = [id(p) for g in opt.param_groups for p in g['params']]
    assert len(ids) == len(set(ids)) and sum(p.numel() for g in opt.param_groups for p in g['params']) == \
        count_params(model)
    decayed = {id(p) for g in opt.param_groups if g['weight_decay'] > 0 for p in g['params']}
    assert all(id(m.weight) in decayed for _, m in tied_modules(model))


@pytest.mark.parametrize('name', [MODEL, 'resnet26_pe_cifar'])
def test_non_reentrant_checkpointing_gives_the_same_gradients(name):
    torch.manual_seed(0)
    model = create_model(name).train()
    size = model.pretrained_cfg['input_size'][-1]
    x = torch.randn(4, 3, size, size)
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        model.set_grad_checkpointing(ckpt)
        model(x).square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_recipes_and_unknown_keys():
    assert resolve_config('resnet', batch_size=512).scaled_lr() == pytest.approx(0.2)
    assert resolve_config('deit', batch_size=256).scaled_lr() == pytest.approx(2.5e-4)
    with pytest.raises(ConfigError, match='did you mean batch_size'):
        resolve_config('deit', batch_sise=3)
    with pytest.raises(ConfigError, match='unknown recipe'):
        resolve_config('imagenet21k')


def test_resume_with_more_epochs_extends_the_schedule(tmp_path):
    train(_cfg(epochs=2), tmp_path / 'short', progress=False)
    train(resume_config(tmp_path / 'short', {'epochs': 4}), tmp_path / 'short', resume=True, progress=False)
    train(_cfg(epochs=4), tmp_path / 'long', progress=False)
    lr = lambda run: [json.loads(r)['lr'] for r in (tmp_path / run / 'metrics.jsonl').read_text().splitlines()]  # noqa: E731
    short, long = lr('short'), lr('long')
    assert len(short) == 4 and short[2:] == pytest.approx(long[2:])  # not stuck at min_lr after resuming


def test_resume_at_max_steps_takes_no_step(tmp_path):
    first = train(_cfg(max_steps=3), tmp_path / 'r', progress=False)
    again = train(resume_config(tmp_path / 'r', {}), tmp_path / 'r', resume=True, progress=False)
    assert len(first.step_losses) == 3 and again.step_losses == [] and again.status == 'stopped'


def test_bad_model_kwargs_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match='model-kwargs'):
        train(_cfg(model_kwargs={'attn_form': 'kqv'}), tmp_path / 'r', progress=False)
    with pytest.raises(ConfigError, match='--sched'):
        train(_cfg(sched='plateau'), tmp_path / 'r2', progress=False)
    assert not (tmp_path / 'r' / 'config.json').exists()  # nothing written before the checks pass


# ---------------------------------------------------------------------------- configs

def test_train_leaves_the_callers_config_as_it_is(tmp_path, monkeypatch):
    """train() makes new configs (absolute data path, channels_last chosen); the one passed in is not changed."""
    monkeypatch.chdir(tmp_path)
    for i, c in enumerate(('a', 'b')):
        (tmp_path / 'imgs' / c).mkdir(parents=True)
        for j in range(8):
            img = np.full((16, 16, 3), 40, dtype=np.uint8)
            img[..., i] = 200
            Image.fromarray(img).save(tmp_path / 'imgs' / c / f'{j}.png')
    cfg = resolve_config('digits', model=MODEL, data='imgs', val_split=0.25, batch_size=4, epochs=1, max_steps=1)
    before = copy.deepcopy(cfg)
    assert cfg.channels_last is None
    train(cfg, 'run', progress=False)
    assert cfg == before
    written = json.loads((tmp_path / 'run' / 'config.json').read_text())
    assert written['data'] == str(tmp_path.resolve() / 'imgs') and written['channels_last'] is False
    resumed = resume_config('run', {'epochs': 2})
    assert (resumed.epochs, resumed.data) == (2, written['data'])


def test_wrong_types_are_refused_naming_the_key():
    with pytest.raises(ConfigError, match="epochs must be int, got str '3'"):
        TrainConfig(epochs='3').validate()
    with pytest.raises(ConfigError, match=r"run/config.json: wrong type: epochs must be int"):
        config_from_dict({'epochs': '3'}, 'run/config.json')
    with pytest.raises(ConfigError, match='epochs must be int'):
        resolve_config('digits', epochs='3')
    refused = {'epochs': 3.0, 'batch_size': True, 'lr': '0.1', 'base_lr': None, 'halve': 1, 'compile': 'yes',
               'in_memory': 0, 'model': 3, 'auto_augment': 5, 'model_kwargs': [1], 'val_split': '0.1'}
    for key, value in refused.items():
        with pytest.raises(ConfigError, match=rf'{key} must be (int|float|bool|str|dict)'):
            config_from_dict({key: value})
    with pytest.raises(ConfigError, match="lr must be float or None.*; halve must be bool"):  # all of them at once
        config_from_dict({'lr': '0.1', 'halve': 'no'})
    cfg = config_from_dict({'warmup_epochs': 1, 'lr': 1, 'base_lr': 2, 'val_split': None, 'in_memory': None,
                            'channels_last': True, 'model_kwargs': {'depth': 1}})  # an int is a float; None if Optional
    assert (cfg.warmup_epochs, cfg.lr, cfg.val_split) == (1, 1, None)


def test_command_line_values_have_the_config_types(tmp_path):
    from rowcol.apps.cli import _overrides, build_parser
    from rowcol.apps.config import FIELD_TYPES
    args = build_parser().parse_args(['train', '--epochs', '3', '--lr', '1', '--warmup-epochs', '2', '--halve',
                                      '--no-in-memory', '--model-kwargs', '{"depth": 1}', '--val-split', '0.1',
                                      '--auto-augment', 'rand-m9', '--max-steps', '0'])
    overrides = _overrides(args)
    assert overrides == {'epochs': 3, 'lr': 1.0, 'warmup_epochs': 2.0, 'halve': True, 'in_memory': False,
                         'model_kwargs': {'depth': 1}, 'val_split': 0.1, 'auto_augment': 'rand-m9', 'max_steps': 0}
    assert type(overrides['lr']) is float and type(overrides['epochs']) is int
    cfg = resolve_config('digits', **overrides)
    assert cfg.epochs == 3 and cfg.halve is True
    assert set(FIELD_TYPES) == {f.name for f in dataclasses.fields(TrainConfig)}


def test_recipe_epochs_are_the_documented_ones():
    from rowcol.apps.config import RECIPES
    assert resolve_config('cifar_vit').epochs == 25 and '--epochs 25' in RECIPES['cifar_vit'].__doc__
    assert resolve_config('cifar_resnet').epochs == 30 and '--epochs 30' in RECIPES['cifar_resnet'].__doc__
    assert TrainConfig() == resolve_config()  # the dataclass defaults are the default recipe's


def test_train_state_is_the_loop_entry_of_train_state_pt(tmp_path):
    from rowcol.apps.train import TrainState
    loop = {'epoch': 1, 'batch': 3, 'step': 11, 'best_top1': 41.5, 'nonfinite': 0, 'loss_sum': 12.25, 'count': 96.0,
            'seconds': 4.5}  # as every run directory stores it
    state = TrainState.from_dict(loop)
    assert state.to_dict() == loop and list(state.to_dict()) == list(loop) and state.losses == []
    train(_cfg(max_steps=3), tmp_path / 'r', progress=False)
    saved = torch.load(tmp_path / 'r' / 'train_state.pt', weights_only=True)
    assert list(saved) == ['model', 'optimizer', 'ema', 'scaler', 'loop'] and list(saved['loop']) == list(loop)
    assert TrainState.from_dict(saved['loop']).to_dict() == saved['loop'] and saved['loop']['step'] == 3
