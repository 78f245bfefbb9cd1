"""The command line end to end on tiny local data: params, train, eval, compare, and bad input."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rowcol.apps.cli import main

MODEL = 'vit_pe_micro_patch4_16'
FAST = ['--epochs', '1', '--batch-size', '8', '--quiet']


def _folder(root: Path, classes=('cat', 'dog', 'owl'), per_class=12, size=16) -> Path:
    rng = np.random.default_rng(0)
    for i, c in enumerate(classes):
        (root / c).mkdir(parents=True)
        for j in range(per_class):
            img = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
            img[..., i] += 150  # one bright channel per class: learnable
            Image.fromarray(img).save(root / c / f'{j:03d}.png')
    return root


@pytest.fixture
def folder(tmp_path):
    return _folder(tmp_path / 'imgs')


def test_params_json(capsys):
    assert main(['params', 'vit_pe_tiny_patch16_224', 'resnet50_pe', '--json']) == 0
    rows = {r['model']: r for r in json.loads(capsys.readouterr().out)}
    assert set(rows['resnet50_pe']) == {'model', 'params', 'dense', 'dense_params', 'ratio', 'macs', 'dense_macs'}
    assert rows['vit_pe_tiny_patch16_224']['params'] == 3_063_208
    assert rows['vit_pe_tiny_patch16_224']['dense_params'] == 5_717_416
    assert rows['vit_pe_tiny_patch16_224']['macs'] == rows['vit_pe_tiny_patch16_224']['dense_macs']
    assert rows['resnet50_pe']['params'] == 15_515_176 and rows['resnet50_pe']['dense'] == 'resnet50'
    assert main(['params', 'resnet50_pe', '--num-classes', '0', '--json']) == 0
    assert json.loads(capsys.readouterr().out)[0]['params'] == 13_466_176


def test_train_then_eval_json(folder, tmp_path, capsys):
    run = tmp_path / 'run'
    assert main(['train', '--model', MODEL, '--data', str(folder), '--val-split', '0.25', '--output', str(run),
                 '--crop-padding', '1', *FAST]) == 0
    capsys.readouterr()
    assert main(['eval', '--checkpoint', str(run), '--data', str(folder), '--json']) == 0
    res = json.loads(capsys.readouterr().out)
    assert {'top1', 'top5', 'loss', 'num_images', 'per_class'} <= set(res)
    assert res['split'] == 'val' and res['num_images'] == 9  # the run's own 25% split, 3 per class
    assert set(res['per_class']) == {'cat', 'dog', 'owl'} and Path(res['confusion_png']).is_file()
    logged = json.loads((run / 'metrics.jsonl').read_text().splitlines()[-1])
    assert res['top1'] == pytest.approx(logged['val_top1'])
    # a bare folder of class folders with the same classes is scored whole
    other = _folder(tmp_path / 'other', per_class=2)
    assert main(['eval', '--checkpoint', str(run), '--data', str(other), '--json', '--confusion', '']) == 0
    assert json.loads(capsys.readouterr().out)['num_images'] == 6
    # the same images copied elsewhere are still the run's training data: its split is reused
    moved = shutil.copytree(folder, tmp_path / 'moved')
    assert main(['eval', '--checkpoint', str(run), '--data', str(moved), '--json', '--confusion', '']) == 0
    res = json.loads(capsys.readouterr().out)
    assert res['split'] == 'val' and res['top1'] == pytest.approx(logged['val_top1'])
    # ... but not once a file differs
    Image.new('RGB', (16, 16)).save(moved / 'cat' / '000.png')
    assert main(['eval', '--checkpoint', str(run), '--data', str(moved), '--json', '--confusion', '']) == 0
    res = json.loads(capsys.readouterr().out)
    assert res['split'] == 'all' and res['num_images'] == 36


def test_eval_rejects_other_classes_and_bad_checkpoints(folder, tmp_path, capsys):
    run = tmp_path / 'run'
    assert main(['train', '--model', MODEL, '--data', str(folder), '--output', str(run), '--max-steps', '1',
                 *FAST]) == 0
    wrong = _folder(tmp_path / 'wrong', classes=('cat', 'dog', 'emu'), per_class=1)
    assert main(['eval', '--checkpoint', str(run), '--data', str(wrong)]) == 2
    assert 'classes do not match' in capsys.readouterr().err
    assert main(['eval', '--checkpoint', str(tmp_path / 'nope'), '--data', str(folder)]) == 2
    assert 'nope' in capsys.readouterr().err
    other = tmp_path / 'other'
    assert main(['train', '--model', 'vit_micro_patch4_16', '--data', str(folder), '--output', str(other),
                 '--max-steps', '1', *FAST]) == 0
    (run / 'model.safetensors').write_bytes((other / 'model.safetensors').read_bytes())
    assert main(['eval', '--checkpoint', str(run), '--data', str(folder)]) == 2
    assert 'does not fit the model' in capsys.readouterr().err


def test_bad_data_is_named(tmp_path, folder, capsys):
    assert main(['train', '--model', MODEL, '--data', str(tmp_path / 'missing'), *FAST]) == 2
    assert 'missing' in capsys.readouterr().err
    (tmp_path / 'empty').mkdir()
    assert main(['train', '--model', MODEL, '--data', str(tmp_path / 'empty'), *FAST]) == 2
    assert 'no class folders' in capsys.readouterr().err
    (folder / 'zebra').mkdir()
    assert main(['train', '--model', MODEL, '--data', str(folder), *FAST, '--output', str(tmp_path / 'r')]) == 2
    assert 'zebra' in capsys.readouterr().err


def test_bad_images_stop_or_are_skipped(folder, tmp_path, capsys):
    (folder / 'cat' / 'zero.png').write_bytes(b'')
    (folder / 'dog' / 'notes.jpg').write_text('not an image')
    assert main(['train', '--model', MODEL, '--data', str(folder), '--output', str(tmp_path / 'a'), *FAST]) == 2
    assert 'zero.png' in capsys.readouterr().err
    assert not (tmp_path / 'a' / 'model.safetensors').exists()
    out = tmp_path / 'b'
    assert main(['train', '--model', MODEL, '--data', str(folder), '--output', str(out), '--skip-bad-images',
                 *FAST]) == 0
    assert 'skipped 2 bad image' in capsys.readouterr().out
    assert {Path(p).name for p, _ in json.loads((out / 'skipped_images.json').read_text())} == {'zero.png', 'notes.jpg'}
    assert main(['train', '--model', MODEL, '--data', str(folder), '--output', str(tmp_path / 'c'),
                 '--skip-bad-images', '--max-bad-images', '1', *FAST]) == 2
    assert 'max_bad' in capsys.readouterr().err


def test_unknown_model_and_flags(folder, capsys):
    assert main(['train', '--model', 'vit_pe_tiny_patch4_23', '--data', str(folder), *FAST]) == 2
    assert 'did you mean vit_pe_tiny_patch4_32' in capsys.readouterr().err
    assert main(['train', '--model', MODEL, '--data', str(folder), '--recipe', 'nope', *FAST]) == 2
    assert 'unknown recipe' in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(['train', '--batchsize', '3'])


def test_compare_writes_report(folder, tmp_path, capsys):
    out = tmp_path / 'cmp'
    assert main(['compare', '--model', MODEL, '--data', str(folder), '--val-split', '0.25', '--output', str(out),
                 *FAST]) == 0
    report = json.loads((out / 'report.json').read_text())
    assert report['dense']['model'] == 'vit_micro_patch4_16' and report['pe']['model'] == MODEL
    assert report['pe']['params'] < 0.6 * report['dense']['params']
    assert report['pe']['macs'] == report['dense']['macs']
    assert {'val_top1', 'val_top5', 'train_seconds', 'img_per_s'} <= set(report['pe'])
    assert (out / 'report.md').is_file() and (out / 'curves.png').is_file()
    # same split and data order for both runs
    assert (out / 'dense' / 'split.json').read_text() == (out / 'pe' / 'split.json').read_text()
    assert main(['compare', '--model', MODEL, '--data', str(folder), '--output', str(out), *FAST]) == 2
    assert '--resume or --overwrite' in capsys.readouterr().err


def test_eval_reuses_the_split_of_a_train_val_layout(tmp_path, capsys, monkeypatch):
    root = tmp_path / 'ds'
    _folder(root / 'train')
    _folder(root / 'val', per_class=2)
    run = tmp_path / 'run'
    assert main(['train', '--model', MODEL, '--data', str(root), '--val-split', '0.25', '--output', str(run),
                 *FAST]) == 0
    capsys.readouterr()
    monkeypatch.chdir(tmp_path)  # a relative path from another directory is still the run's data
    assert main(['eval', '--checkpoint', str(run), '--data', 'ds', '--json', '--confusion', '']) == 0
    res = json.loads(capsys.readouterr().out)
    assert res['split'] == 'val' and res['num_images'] == 9  # 25% of ds/train, not ds/val
    assert main(['eval', '--checkpoint', str(run), '--data', 'ds', '--split', 'all', '--json',
                 '--confusion', '']) == 0
    assert json.loads(capsys.readouterr().out)['num_images'] == 6  # ds/val


def test_eval_tells_the_training_folder_from_its_parent_and_from_a_val_only_folder(tmp_path, capsys):
    root = tmp_path / 'ds'
    _folder(root / 'train')
    _folder(root / 'val', per_class=2)
    run = tmp_path / 'run'
    assert main(['train', '--model', MODEL, '--data', str(root / 'train'), '--val-split', '0.25',
                 '--output', str(run), *FAST]) == 0
    assert json.loads((run / 'split.json').read_text())['files']  # fingerprinted
    assert json.loads((run / 'config.json').read_text())['device_used'] == 'cpu'
    capsys.readouterr()
    scored = {}
    held_out = shutil.copytree(root / 'val', tmp_path / 'held_out' / 'val')  # a folder with only val/
    copy = shutil.copytree(root / 'train', tmp_path / 'copy')
    for name, data in (('parent', root), ('val_only', held_out.parent), ('copy', copy)):
        assert main(['eval', '--checkpoint', str(run), '--data', str(data), '--json', '--confusion', '']) == 0
        res = json.loads(capsys.readouterr().out)
        scored[name] = (res['split'], res['num_images'])
    # ds/ holds ds/train/... : not the run's folder, so its val/ part is scored
    assert scored == {'parent': ('all', 6), 'val_only': ('all', 6), 'copy': ('val', 9)}


def test_compare_sends_pe_only_kwargs_to_the_pe_run(folder, tmp_path):
    out = tmp_path / 'cmp'
    assert main(['compare', '--model', MODEL, '--data', str(folder), '--output', str(out), '--max-steps', '1',
                 '--model-kwargs', '{"attn_form": "vo", "mlp_act": "relu"}', *FAST]) == 0
    report = json.loads((out / 'report.json').read_text())
    assert report['pe']['model_kwargs'] == {'attn_form': 'vo', 'mlp_act': 'relu'}
    assert report['dense']['model_kwargs'] == {'mlp_act': 'relu'}


def test_interrupted_compare_stops_with_the_signal_code(folder, tmp_path, monkeypatch, capsys):
    import signal

    import rowcol.apps.compare as cmp
    from rowcol.apps.runtime import Stop
    from rowcol.apps.train import TrainResult
    calls = []
    monkeypatch.setattr(Stop, 'signum', None)  # restored after the test

    def interrupted(cfg, run_dir, **kw):
        calls.append(cfg.model)
        Stop.signum = signal.SIGTERM
        return TrainResult(run_dir, 'interrupted')
    monkeypatch.setattr(cmp, 'train', interrupted)
    assert main(['compare', '--model', MODEL, '--data', str(folder), '--output', str(tmp_path / 'c'), *FAST]) == 143
    assert calls == ['vit_micro_patch4_16']  # the PE run did not start
    assert 'compare --resume' in capsys.readouterr().err


def test_bad_auto_augment_string_is_named(folder, tmp_path, capsys):
    assert main(['train', '--model', MODEL, '--data', str(folder), '--auto-augment', 'bogus', '--output',
                 str(tmp_path / 'r'), *FAST]) == 2
    assert '--auto-augment' in capsys.readouterr().err


def test_max_steps_zero_finishes_a_stopped_run(folder, tmp_path):
    run = tmp_path / 'run'
    assert main(['train', '--model', MODEL, '--data', str(folder), '--output', str(run), '--max-steps', '1',
                 *FAST]) == 0
    assert main(['train', '--resume', str(run), '--max-steps', '0', '--quiet']) == 0
    assert len((run / 'metrics.jsonl').read_text().splitlines()) == 1  # the one epoch completed


def test_demo_runs_twice_into_its_own_folder(tmp_path, monkeypatch, capsys):
    """`rowcol demo` replaces its own runs on every call (the run-directory marks allow it)."""
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        assert main(['demo', '--epochs', '1', '--subset', '256', '--quiet']) == 0
    out = tmp_path / 'runs' / 'demo-vit_pe_micro_patch4_16'
    assert (out / 'report.md').is_file() and (out / 'pe' / 'model.safetensors').is_file()
