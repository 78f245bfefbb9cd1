"""DDP with shared weights: 2 gloo processes equal one process on the same global batch."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent / 'scripts'))
from ddp_step import build, global_batch  # noqa: E402


def _torchrun(args, tmp_path, nproc=2):
    env = {**os.environ, 'PYTHONPATH': str(ROOT), 'OMP_NUM_THREADS': '1'}
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}', *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow
@pytest.mark.parametrize('name', ['vit_pe_micro_patch4_16', 'resnet26_pe_cifar', 'pvt_v2_b0+halved'])
def test_ddp_gradients_and_step_equal_single_process(name, tmp_path):
    out = tmp_path / 'ddp.safetensors'
    _torchrun([str(ROOT / 'tests' / 'scripts' / 'ddp_step.py'), name, str(out)], tmp_path)
    got = load_file(out)

    model, size = build(name)  # a halved timm model: W in fc1, Wᵀ in fc2 (TiedT), one Parameter
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = global_batch(size)
    # Each process normalises its own half with BatchNorm (no SyncBatchNorm on CPU), so the
    # single-process reference runs the two halves through the model separately; a ViT has no
    # batch-dependent layer and the two forms agree.
    losses = [F.cross_entropy(model(xs), ys) for xs, ys in zip(x.tensor_split(2), y.tensor_split(2))]
    (sum(losses) / 2).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(got[f'grad.{n}'], p.grad, rtol=1e-4, atol=1e-6, msg=f'gradient of {n}')
    opt.step()
    for n, p in model.named_parameters():
        torch.testing.assert_close(got[f'weight.{n}'], p.detach(), rtol=1e-4, atol=1e-6, msg=f'weight {n}')


@pytest.mark.slow
def test_torchrun_train_matches_single_process(tmp_path):
    """`torchrun -m rowcol train` on 2 processes writes the weights one process would."""
    args = ['--model', 'vit_pe_micro_patch4_16', '--recipe', 'digits', '--subset', '128', '--batch-size', '32',
            '--max-steps', '3', '--opt', 'momentum', '--momentum', '0', '--lr', '0.3', '--quiet']
    _torchrun(['-m', 'rowcol', 'train', *args, '--output', str(tmp_path / 'two')], tmp_path)
    env = {**os.environ, 'PYTHONPATH': str(ROOT)}
    subprocess.run([sys.executable, '-m', 'rowcol', 'train', *args, '--output', str(tmp_path / 'one')],
                   env=env, check=True, capture_output=True, timeout=300)
    a, b = load_file(tmp_path / 'two' / 'model.safetensors'), load_file(tmp_path / 'one' / 'model.safetensors')
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6, msg=k)
    assert not any((tmp_path / 'two').glob('*.tmp'))
