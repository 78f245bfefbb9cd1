"""benchmarks/profile_pair.py: the op-time comparison, and the script end to end on a tiny model."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'benchmarks'))

import profile_pair  # noqa: E402


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_compare_orders_by_absolute_difference_and_totals() -> None:
    pe = {'aten::mm': 5.0, 'aten::cat': 3.0, 'aten::gelu': 1.0}
    dense = {'aten::mm': 5.5, 'aten::convolution': 0.5}
    table = profile_pair.compare(pe, dense, rows=3, names=('a', 'b')).splitlines()
    assert table[0] == '| op | a ms/step | b ms/step | a - b |'
    ops = [line.split(' | ')[0].lstrip('| ') for line in table[2:5]]
    assert ops == ['aten::cat', 'aten::gelu', 'aten::convolution']  # by |difference|, ties by name
    assert '| aten::convolution | 0.00 | 0.50 | -0.50 |' in table  # an op only the second model runs
    assert table[-1] == '| **all ops** | 9.0 | 6.0 | +3.0 |'  # totals over all ops, not only the rows shown


def test_op_times_of_a_train_step(one_thread) -> None:
    times = profile_pair.op_times('vit_pe_micro_patch4_16', mode='train', batch_size=2, amp=None,
                                  channels_last=False, device=torch.device('cpu'), warmup=1, steps=1)
    assert all(v >= 0 for v in times.values())
    assert any('mm' in k for k in times)  # the linear layers' matmuls
    assert any('backward' in k.lower() for k in times)  # a train step profiles backward too


def test_script_json_names_both_models(one_thread, capsys) -> None:
    profile_pair.main(['--model', 'vit_pe_micro_patch4_16', '--mode', 'infer', '--batch-size', '2',
                       '--warmup', '1', '--steps', '1', '--device', 'cpu', '--threads', '1', '--json'])
    out = json.loads(capsys.readouterr().out)
    assert (out['model'], out['vs'], out['device'], out['threads']) == (
        'vit_pe_micro_patch4_16', 'vit_micro_patch4_16', 'cpu', 1)
    assert out['mode'] == 'infer' and out['model_ms'] and out['vs_ms']
