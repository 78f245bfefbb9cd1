"""Training halved models: --halve, --init-from (a dense run, halved with init='dense'), --teacher."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from rowcol.apps.checkpoint import load_run, load_weights
from rowcol.apps.cli import main
from rowcol.halve import halve
from rowcol.layers import PeMlp
from rowcol.models import create_model
from rowcol.apps.train import distill_loss

DENSE = 'vit_micro_patch4_16'
FAST = ['--recipe', 'digits', '--epochs', '1', '--subset', '256', '--batch-size', '32', '--quiet']


@pytest.fixture(scope='module')
def dense_run(tmp_path_factory):
    out = tmp_path_factory.mktemp('runs') / 'dense'
    assert main(['train', '--model', DENSE, *FAST, '--output', str(out)]) == 0
    return out


def test_distill_loss_limits():
    torch.manual_seed(0)
    s, t, y = torch.randn(8, 10), torch.randn(8, 10), torch.randint(0, 10, (8,))
    ce = F.cross_entropy(s, y)
    torch.testing.assert_close(distill_loss(ce, s, t, alpha=0.0, tau=2.0), ce)
    assert distill_loss(ce, s, s, alpha=1.0, tau=3.0).abs() < 1e-6  # same logits: no KL
    kl = F.kl_div(F.log_softmax(s / 2, -1), F.softmax(t / 2, -1), reduction='batchmean')
    torch.testing.assert_close(distill_loss(ce, s, t, alpha=0.25, tau=2.0), 0.75 * ce + 0.25 * 4 * kl)


def test_train_halved_timm_model_then_eval_and_resume(tmp_path, capsys):
    out = tmp_path / 'h'
    assert main(['train', '--model', DENSE, '--halve', '--halve-attn', 'vo', *FAST, '--max-steps', '3',
                 '--output', str(out)]) == 0
    cfg = json.loads((out / 'config.json').read_text())
    assert cfg['halve'] is True and cfg['halve_attn'] == 'vo'
    assert main(['train', '--resume', str(out), '--max-steps', '0', '--quiet']) == 0
    model, _ = load_run(out)  # rebuilt halved from config.json, loaded strictly
    assert isinstance(model.blocks[0].mlp, PeMlp) and hasattr(model.blocks[0].attn, 'vo')
    capsys.readouterr()
    assert main(['eval', '--checkpoint', str(out), '--data', 'digits', '--confusion', '', '--json']) == 0
    assert json.loads(capsys.readouterr().out)['num_images'] > 0


def test_init_from_starts_at_the_halved_dense_weights(dense_run, tmp_path):
    from rowcol.apps.config import resolve_config
    from rowcol.apps.train import _build_model, _init_from
    cfg = resolve_config('digits', model=DENSE, halve=True, init_from=str(dense_run))
    classes = json.loads((dense_run / 'config.json').read_text())['classes']
    model = _init_from(cfg, _build_model(cfg, len(classes), halved=False), classes)
    dense = create_model(DENSE, num_classes=len(classes))
    load_weights(dense, dense_run / 'model.safetensors')
    expected = halve(copy.deepcopy(dense), init='dense')
    for (n, a), (m, b) in zip(model.state_dict().items(), expected.state_dict().items()):
        assert n == m and torch.equal(a, b), n
    assert model.halve_report.init == 'dense'


def test_init_from_and_teacher_train_and_record(dense_run, tmp_path):
    out = tmp_path / 'conv'
    assert main(['train', '--init-from', str(dense_run), '--teacher', str(dense_run), '--distill-alpha', '0.7',
                 *FAST, '--mixup', '0.2', '--output', str(out)]) == 0  # model taken from the run; soft targets
    cfg = json.loads((out / 'config.json').read_text())
    assert (cfg['model'], cfg['halve'], cfg['distill_alpha']) == (DENSE, True, 0.7)
    assert cfg['init_from'] == str(dense_run.resolve()) and cfg['teacher'] == str(dense_run.resolve())
    model, _ = load_run(out)
    assert isinstance(model.blocks[0].mlp, PeMlp)


def test_refusals_write_nothing(dense_run, tmp_path, capsys):
    out = tmp_path / 'x'
    halved_run = tmp_path / 'pe'
    assert main(['train', '--model', DENSE, '--halve', *FAST, '--max-steps', '1', '--output', str(halved_run)]) == 0
    capsys.readouterr()
    assert main(['train', '--init-from', str(halved_run), *FAST, '--output', str(out)]) == 2
    assert 'a PE run' in capsys.readouterr().err
    assert main(['train', '--init-from', str(dense_run), '--model', 'vit_pe_micro_patch4_16', *FAST,
                 '--output', str(out)]) == 2
    assert 'the run trained vit_micro_patch4_16' in capsys.readouterr().err
    assert main(['train', '--init-from', str(tmp_path / 'nope'), *FAST, '--output', str(out)]) == 2
    assert 'not found' in capsys.readouterr().err
    other = tmp_path / 'other'
    other.mkdir()
    for f in dense_run.iterdir():
        if f.is_file():
            (other / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((other / 'config.json').read_text())
    (other / 'config.json').write_text(json.dumps({**cfg, 'classes': [f'c{i}' for i in range(10)]}))
    assert main(['train', '--model', 'vit_pe_micro_patch4_16', '--teacher', str(other), *FAST,
                 '--output', str(out)]) == 2
    assert 'differ from the data' in capsys.readouterr().err
    assert main(['train', '--model', 'resnet18', '--halve', *FAST, '--img-size', '16', '--output', str(out)]) == 2
    assert 'resnet18: nothing to halve' in capsys.readouterr().err
    assert main(['params', '--halve', 'resnet18']) == 2
    assert not out.exists()


def test_halved_run_exports_analyzes_and_benches(tmp_path, capsys):
    out = tmp_path / 'pvt'
    assert main(['train', '--model', 'pvt_v2_b0', '--halve',
                 '--img-size', '32', *FAST, '--max-steps', '2', '--output', str(out)]) == 0
    capsys.readouterr()
    onnx_path = tmp_path / 'pvt.onnx'
    assert main(['export', '--checkpoint', str(out), '--output', str(onnx_path)]) == 0  # checks each W once
    assert onnx_path.stat().st_size > 0
    capsys.readouterr()
    assert main(['analyze', '--checkpoint', str(out), '--data', 'digits', '--num-images', '32', '--json',
                 '--plot', '']) == 0
    res = json.loads(capsys.readouterr().out)
    names = {r['name'] for r in res['layers']}
    assert 'stages.0.blocks.0.mlp.fc1' in names and 'stages.0.blocks.0.attn.q' in names  # Wᵀ inputs seen via TiedT
    assert main(['bench', '--model', 'convnext_atto', '--halve', '--img-size', '32', '--batch-size', '2',
                 '--steps', '1', '--repeats', '1', '--warmup', '1', '--latency-iters', '1', '--json']) == 0
    bench = json.loads(capsys.readouterr().out)
    assert bench['ratio_params'] < 0.7


def test_eval_scores_a_timm_style_checkpoint(dense_run, tmp_path, capsys):
    """What timm's train.py writes (state_dict / state_dict_ema in a .pth.tar), a safetensors file,
    and refusals: a pickle payload, a file of another model."""
    model, _ = load_run(dense_run)
    sd = {f'module.{k}': v for k, v in model.state_dict().items()}  # as saved from DDP
    ema = {k: v + 0.01 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    torch.save({'epoch': 3, 'arch': DENSE, 'state_dict': sd, 'state_dict_ema': ema}, tmp_path / 'model_best.pth.tar')
    capsys.readouterr()
    assert main(['eval', '--model', DENSE, '--weights', str(tmp_path / 'model_best.pth.tar'), '--data', 'digits',
                 '--json']) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main(['eval', '--checkpoint', str(dense_run), '--data', 'digits', '--split', 'all', '--json',
                 '--confusion', '']) == 0
    assert json.loads(capsys.readouterr().out)['top1'] == plain['top1']  # the same weights, the same images
    assert main(['eval', '--model', DENSE, '--weights', str(tmp_path / 'model_best.pth.tar'), '--ema', '--data',
                 'digits', '--json']) == 0
    assert 'state_dict_ema' in json.loads(capsys.readouterr().out)['weights']
    assert main(['eval', '--model', DENSE, '--weights', str(dense_run / 'model.safetensors'), '--data', 'digits',
                 '--json']) == 0
    assert json.loads(capsys.readouterr().out)['top1'] == plain['top1']
    torch.save({'x': torch.nn.Linear(2, 2)}, tmp_path / 'evil.pth')  # a pickled module: weights_only refuses it
    assert main(['eval', '--model', DENSE, '--weights', str(tmp_path / 'evil.pth'), '--data', 'digits']) == 2
    assert 'weights_only=True' in capsys.readouterr().err
    assert main(['eval', '--model', 'vit_pe_micro_patch4_16', '--weights', str(tmp_path / 'model_best.pth.tar'),
                 '--data', 'digits']) == 2
    assert 'does not fit the model' in capsys.readouterr().err
    assert main(['eval', '--model', DENSE, '--data', 'digits']) == 2
    assert main(['eval', '--checkpoint', str(dense_run), '--weights', 'x.pth', '--data', 'digits']) == 2
    assert not list(tmp_path.glob('*.png'))


def test_log_tensorboard_writes_the_metrics_scalars(tmp_path):
    pytest.importorskip('tensorboard')
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = tmp_path / 'tb'
    args = ['--model', 'vit_pe_micro_patch4_16', '--recipe', 'digits', '--epochs', '2', '--subset', '128',
            '--batch-size', '32', '--quiet', '--log', 'tensorboard']
    assert main(['train', *args, '--max-steps', '4', '--output', str(out)]) == 0  # epoch 1 of 2, then stop
    assert main(['train', '--resume', str(out), '--max-steps', '0', '--quiet']) == 0
    rows = [json.loads(line) for line in (out / 'metrics.jsonl').read_text().splitlines()]
    events = EventAccumulator(str(out)).Reload()
    assert {'train_loss', 'val_top1', 'lr'} <= set(events.Tags()['scalars'])
    for key in ('train_loss', 'val_top1'):
        logged = {e.step: e.value for e in events.Scalars(key)}
        assert logged == pytest.approx({r['epoch']: r[key] for r in rows})
