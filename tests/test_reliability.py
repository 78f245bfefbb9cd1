"""Issue 17: symlink loops, run-directory locks and markers, divergence, model_kwargs, checksums, EMA."""
import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from rowcol import checkpoint as ckpt
from rowcol.cli import main
from rowcol.config import resolve_config
from rowcol.data import scan_image_folder
from rowcol.errors import CheckpointError, ConfigError, DataError
from rowcol.train import train
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
    with caplog.at_level(logging.WARNING, logger='rowcol.data'):
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
    with caplog.at_level(logging.WARNING, logger='rowcol.data'):
        samples = scan_image_folder(root)
    assert samples.labels.count(0) == 6 and samples.labels.count(1) == 4
    assert 'extra' in caplog.text and 'b/as' in caplog.text and 'shortcut' in caplog.text


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
