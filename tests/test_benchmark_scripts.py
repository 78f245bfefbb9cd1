"""benchmarks/: profile_pair.py (the op-time comparison, and the script end to end on a tiny model),
perf_tables.py (the bench table) and gpu_session.py (which benches run, in which order)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'benchmarks'))

import gpu_session  # noqa: E402
import perf_tables  # noqa: E402
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


def _bench_json(compile: bool, ratio: float) -> dict:
    r = dict(img_per_s=100.0 * ratio, img_per_s_min=90.0, img_per_s_max=110.0, peak_mem_bytes=2 ** 20)
    d = dict(r, img_per_s=100.0)
    return dict(model='m_pe', vs='m', mode='train', amp='bf16', compile=compile, batch_size=8, repeats=5,
                steps=2, ratio_img_per_s=ratio, results={'m_pe': r, 'm': d})


def test_perf_table_has_a_compile_column_only_when_a_row_is_compiled(tmp_path) -> None:
    (tmp_path / 'bench-a.json').write_text(json.dumps(_bench_json(False, 0.9)))
    eager = perf_tables.bench_table(tmp_path).splitlines()
    assert 'compile' not in eager[0] and eager[0].count('|') == eager[2].count('|') == 13
    (tmp_path / 'bench-b.json').write_text(json.dumps(_bench_json(True, 0.95)))
    both = perf_tables.bench_table(tmp_path).splitlines()
    assert '| compile |' in both[0] and all(line.count('|') == 14 for line in both)
    assert '| bf16 | no | 8 |' in both[2] and '**0.900**' in both[2]
    assert '| bf16 | yes | 8 |' in both[3] and '**0.950**' in both[3]


def test_gpu_session_bench_prewarms_then_runs_compiled_first_in_the_order_given(tmp_path, monkeypatch) -> None:
    calls, prewarmed = [], []

    class Done:
        returncode, stdout, stderr = 0, json.dumps({'ratio_img_per_s': 1.0}), ''

    def run(cmd, **kw):
        calls.append(cmd)
        return Done()

    monkeypatch.setattr(gpu_session.subprocess, 'run', run)
    monkeypatch.setattr(gpu_session, '_prewarm', lambda flags, limit: prewarmed.append((flags, limit)))
    gpu_session.bench(tmp_path, 600, (True, False), only=['r50-infer', 'vit_tiny32-train'], prewarm=100)
    table = dict(gpu_session.BENCHES)
    assert prewarmed == [([table['r50-infer'], table['vit_tiny32-train']], 100)]
    got = [(c[c.index('--model') + 1], c[c.index('--mode') + 1], '--compile' in c) for c in calls]
    assert got == [('resnet50_pe', 'infer', True), ('vit_pe_tiny_patch4_32', 'train', True),
                   ('resnet50_pe', 'infer', False), ('vit_pe_tiny_patch4_32', 'train', False)]
    assert sorted(f.name for f in tmp_path.iterdir()) == [
        'bench-r50-infer-bf16-compile.json', 'bench-r50-infer-bf16.json',
        'bench-vit_tiny32-train-bf16-compile.json', 'bench-vit_tiny32-train-bf16.json']
