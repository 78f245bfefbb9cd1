"""The benchmark scripts' own logic (benchmarks/): op-time comparison and run bookkeeping."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'benchmarks'))

import profile_pair  # noqa: E402


def test_compare_orders_by_absolute_difference_and_totals() -> None:
    pe = {'aten::mm': 5.0, 'aten::cat': 3.0, 'aten::gelu': 1.0}
    dense = {'aten::mm': 5.5, 'aten::convolution': 0.5}
    table = profile_pair.compare(pe, dense, rows=3).splitlines()
    ops = [line.split(' | ')[0].lstrip('| ') for line in table[2:5]]
    assert ops == ['aten::cat', 'aten::gelu', 'aten::convolution']  # by |difference|, ties by name
    assert table[-1] == '| **all ops** | 9.0 | 6.0 | +3.0 |'
    assert '| aten::convolution | 0.00 | 0.50 | -0.50 |' in table  # an op only the dense model runs


def test_op_times_of_a_train_step() -> None:
    torch.set_num_threads(1)
    times = profile_pair.op_times('vit_pe_micro_patch4_16', mode='train', batch_size=2, amp=None,
                                  channels_last=False, device=torch.device('cpu'), warmup=1, steps=1)
    assert all(v >= 0 for v in times.values())
    assert any('mm' in k for k in times)  # the linear layers' matmuls
    assert any('backward' in k.lower() or 'Backward' in k for k in times)  # a train step profiles backward
