"""benchmarks/: run_experiments.py (plans; deadline, SIGTERM and resume with real ``rowcol train``
runs), speed_table.py (which benches run in which order; a tiny table end to end; profiles),
profile_pair.py (the op-time comparison), perf_tables.py (the bench table), saved_tensors.py (memory
kept for backward), ab_switch.py (a switch on and off), depthwise_bf16.py (one conv's op times) and
op_count.py (ops dispatched per step)."""
from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / 'benchmarks'))

import ab_switch  # noqa: E402
import depthwise_bf16  # noqa: E402
import op_count  # noqa: E402
import perf_tables  # noqa: E402
import profile_pair  # noqa: E402
import run_experiments  # noqa: E402
import saved_tensors  # noqa: E402
import speed_table  # noqa: E402

from rowcol.apps.cli import build_parser  # noqa: E402
from rowcol.models import dense_twin  # noqa: E402

MICRO = 'vit_pe_micro_patch4_16'
TINY_PAIRS = [('micro-infer', ['--model', MICRO, '--mode', 'infer'], 2, 2),
              ('micro-train', ['--model', MICRO, '--mode', 'train'], 2, 2)]


@pytest.fixture
def one_thread(monkeypatch):
    monkeypatch.setenv('OMP_NUM_THREADS', '1')  # for the rowcol processes the scripts start
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------- run_experiments.py

@pytest.mark.parametrize('plan', ['cifar10_protocol.json', 'vit_gap.json'])
def test_plans_are_rowcol_train_commands(plan) -> None:
    runs = run_experiments.load_plan(ROOT / 'benchmarks' / 'plans' / plan)
    assert runs and not any(name.endswith(('-h100', '-h200')) for name, _ in runs)  # no machine in the names
    for name, flags in runs:
        args = build_parser().parse_args(['train', *flags])
        assert args.val_split == 0.1 and args.data is None and args.output is None, name


def _run_dir(d: Path, epochs: int, done: int) -> None:
    d.mkdir(parents=True)
    (d / 'config.json').write_text(json.dumps({'epochs': epochs}))
    (d / 'metrics.jsonl').write_text(''.join(json.dumps({'epoch': i + 1}) + '\n' for i in range(done)))


def test_runner_skips_done_runs_and_starts_none_past_the_deadline(tmp_path, monkeypatch) -> None:
    plan = tmp_path / 'plan.json'
    plan.write_text(json.dumps([['a', ['--epochs', '1']], ['b', ['--epochs', '1']], ['c', ['--epochs', '1']]]))
    _run_dir(tmp_path / 'done' / 'a-gpu', epochs=1, done=1)
    _run_dir(tmp_path / 'done' / 'b', epochs=2, done=1)  # one epoch of two: not finished
    monkeypatch.setattr(run_experiments.subprocess, 'Popen', lambda *a, **k: pytest.fail('started a run'))
    out = tmp_path / 'out'
    rc = run_experiments.main([str(plan), '--out', str(out), '--done', str(tmp_path / 'done'), '--suffix', 'gpu',
                               '--only', 'a', 'b', '--deadline', '0'])
    status = json.loads((out / 'status.json').read_text())['runs']
    assert rc == 1 and set(status) == {'a', 'b'}
    assert status['a'] == {'finished': True, 'skipped': str(tmp_path / 'done' / 'a-gpu')}
    assert status['b'] == {'finished': False, 'not_started': True}
    with pytest.raises(SystemExit):
        run_experiments.main([str(plan), '--out', str(out), '--only', 'd'])


def test_runner_stops_at_the_deadline_and_the_next_call_resumes(tmp_path, one_thread) -> None:
    flags = ['--model', 'vit_pe_nano_patch4_32', '--recipe', 'digits', '--subset', '640', '--batch-size', '32',
             '--epochs', '1', '--save-every-steps', '1']
    plan = tmp_path / 'plan.json'
    plan.write_text(json.dumps([['nano', flags]]))
    out = tmp_path / 'out'
    run_dir, log = out / 'nano', out / 'nano.log'
    # the deadline passes as soon as the run has a checkpoint: SIGTERM lands inside training
    first = run_experiments.run_plan(run_experiments.load_plan(plan), out, data='digits', device='cpu',
                                     deadline=1., min_left=0., poll=0.05,
                                     clock=lambda: 10. if (run_dir / 'train_state.pt').exists() else 0.)
    assert first['nano']['stopped'] and first['nano']['rc'] == 128 + signal.SIGTERM, log.read_text()
    assert not first['nano']['finished'] and not (run_dir / 'metrics.jsonl').exists()
    second = run_experiments.run_plan(run_experiments.load_plan(plan), out, data='digits', device='cpu', poll=0.1)
    assert second['nano']['rc'] == 0 and second['nano']['finished'], log.read_text()
    commands = [line for line in log.read_text().splitlines() if line.startswith('$ ')]
    assert len(commands) == 2 and '--output' in commands[0] and f'--resume {run_dir}' in commands[1]
    assert len((run_dir / 'metrics.jsonl').read_text().splitlines()) == 1
    assert run_experiments.main([str(plan), '--out', str(out), '--data', 'digits']) == 0  # finished: skipped
    assert log.read_text().count('$ ') == 2


# ---------------------------------------------------------------------------- speed_table.py

@pytest.mark.parametrize('setting', speed_table.SETTINGS)
def test_speed_table_commands_are_rowcol_bench_commands_of_pe_models(setting) -> None:
    for name, flags, *batches in speed_table.PAIRS:
        cmd = speed_table.bench_cmd(flags, batches[0], setting, 'cuda', speed_table.TIMING['cuda'])
        args = build_parser().parse_args(cmd[3:])
        assert dense_twin(args.model) and args.json, name
        assert args.vs is None or args.vs == f'{args.model}_untied', name  # the twin (default --vs) or the untied layout
        assert (args.amp, args.compile) == ('bf16' if 'bf16' in setting else None, 'compile' in setting)
        assert (args.device, args.steps, args.batch_size) == ('cuda', 5, batches[0])


def test_speed_table_prewarms_then_runs_compiled_first_in_the_order_given(tmp_path, monkeypatch) -> None:
    calls, prewarmed = [], []

    class Done:
        returncode, stdout, stderr = 0, json.dumps({'ratio_img_per_s': 1.0}), ''

    monkeypatch.setattr(speed_table.subprocess, 'run', lambda cmd, **kw: calls.append(cmd) or Done())
    monkeypatch.setattr(speed_table, 'prewarm', lambda cmds, limit: prewarmed.append((cmds, limit)))
    monkeypatch.setattr(speed_table, 'bench_table', lambda d: 'table')
    assert speed_table.main(['--out', str(tmp_path), '--device', 'cuda', '--only', 'r50-infer', 'vit_tiny32-train',
                             '--prewarm', '100', '--deadline', '600']) == 0
    assert [(c[c.index('--model') + 1], '--compile' in c) for c in prewarmed[0][0]] == [
        ('resnet50_pe', True), ('vit_pe_tiny_patch4_32', True)] and prewarmed[0][1] == 100
    assert all(c[c.index('--amp') + 1] == 'bf16' for c in calls)
    got = [(c[c.index('--model') + 1], c[c.index('--mode') + 1], c[c.index('--batch-size') + 1], '--compile' in c)
           for c in calls]
    assert got == [('resnet50_pe', 'infer', '128', True), ('vit_pe_tiny_patch4_32', 'train', '256', True),
                   ('resnet50_pe', 'infer', '128', False), ('vit_pe_tiny_patch4_32', 'train', '256', False)]
    assert sorted(f.name for f in tmp_path.iterdir()) == [
        'bench-r50-infer-bf16-compile.json', 'bench-r50-infer-bf16.json',
        'bench-vit_tiny32-train-bf16-compile.json', 'bench-vit_tiny32-train-bf16.json', 'table.md']
    calls.clear()
    assert speed_table.main(['--out', str(tmp_path / 'late'), '--device', 'cpu', '--deadline', '10']) == 1
    assert calls == []  # under 20 s left: nothing starts


def test_speed_table_measures_two_tiny_pairs(tmp_path, monkeypatch, one_thread, capsys) -> None:
    monkeypatch.setattr(speed_table, 'PAIRS', TINY_PAIRS)
    assert speed_table.main(['--out', str(tmp_path), '--device', 'cpu', '--settings', 'fp32', '--warmup', '0',
                             '--steps', '1', '--repeats', '1', '--latency-iters', '1']) == 0
    for name, mode in (('micro-infer', 'infer'), ('micro-train', 'train')):
        r = json.loads((tmp_path / f'bench-{name}-fp32.json').read_text())
        assert (r['model'], r['vs'], r['mode'], r['batch_size'], r['amp'], r['steps']) == (
            MICRO, 'vit_micro_patch4_16', mode, 2, None, 1)
    table = (tmp_path / 'table.md').read_text().splitlines()
    assert len(table) == 4 and table[2].startswith(f'| {MICRO} | vit_micro_patch4_16 | infer | fp32 |')
    assert '\n'.join(table) in capsys.readouterr().out


def test_speed_table_profiles_eager_settings(tmp_path, monkeypatch, one_thread) -> None:
    monkeypatch.setattr(speed_table, 'PAIRS', TINY_PAIRS)
    assert speed_table.main(['--out', str(tmp_path), '--profile', '--device', 'cpu', '--only', 'micro-infer',
                             '--settings', 'fp32', 'fp32-compile', '--warmup', '1', '--steps', '1']) == 1
    assert [f.name for f in tmp_path.iterdir()] == ['profile-micro-infer-fp32.md']  # compiled: not profiled
    text = (tmp_path / 'profile-micro-infer-fp32.md').read_text()
    assert text.startswith(f'{MICRO} vs vit_micro_patch4_16, infer, batch 2, fp32, cpu, 1 steps')
    assert f'| op | {MICRO} ms/step | vit_micro_patch4_16 ms/step |' in text and '**all ops**' in text


# ---------------------------------------------------------------------------- profile_pair.py, perf_tables.py

def test_compare_orders_by_absolute_difference_and_totals() -> None:
    pe = {'aten::mm': 5.0, 'aten::cat': 3.0, 'aten::gelu': 1.0}
    dense = {'aten::mm': 5.5, 'aten::convolution': 0.5}
    table = profile_pair.compare(pe, dense, rows=3, names=('a', 'b')).splitlines()
    assert table[0] == '| op | a ms/step | b ms/step | a - b |'
    ops = [line.split(' | ')[0].lstrip('| ') for line in table[2:5]]
    assert ops == ['aten::cat', 'aten::gelu', 'aten::convolution']  # by |difference|, ties by name
    assert '| aten::convolution | 0.00 | 0.50 | -0.50 |' in table  # an op only the second model runs
    assert table[-1] == '| **all ops** | 9.0 | 6.0 | +3.0 |'  # totals over all ops, not only the rows shown


def test_compare_totals_gpu_kernels_once() -> None:
    """On a GPU an aten op's device time is its kernels' time: the total sums the kernel rows only."""
    pe = {'aten::mm': 5.0, 'kernel: gemm_a': 5.0, 'aten::cat': 1.0, 'kernel: cat_k': 1.0}
    dense = {'aten::mm': 4.0, 'kernel: gemm_b': 4.0}
    table = profile_pair.compare(pe, dense, rows=10).splitlines()
    assert table[-1] == '| **all kernels** | 6.0 | 4.0 | +2.0 |'


def test_gpu_profile_rows_keep_kernels_apart_and_drop_device_ranges() -> None:
    from types import SimpleNamespace

    from torch.autograd import DeviceType
    ev = lambda key, dev, note=False: SimpleNamespace(key=key, device_type=dev, is_user_annotation=note)  # noqa: E731
    assert profile_pair.row_name(ev('aten::mm', DeviceType.CPU), cuda=True) == 'aten::mm'
    assert profile_pair.row_name(ev('gemm', DeviceType.CUDA), cuda=True) == 'kernel: gemm'
    assert profile_pair.row_name(ev('Optimizer.step#SGD.step', DeviceType.CUDA, True), cuda=True) is None
    assert profile_pair.row_name(ev('aten::mm', DeviceType.CPU), cuda=False) == 'aten::mm'


def test_op_times_of_a_train_step(one_thread) -> None:
    times = profile_pair.op_times(MICRO, mode='train', batch_size=2, amp=None,
                                  channels_last=False, device=torch.device('cpu'), warmup=1, steps=1)
    assert all(v >= 0 for v in times.values())
    assert any('mm' in k for k in times)  # the linear layers' matmuls
    assert any('backward' in k.lower() for k in times)  # a train step profiles backward too


def test_profile_pair_json_names_both_models(one_thread, capsys) -> None:
    profile_pair.main(['--model', MICRO, '--mode', 'infer', '--batch-size', '2',
                       '--warmup', '1', '--steps', '1', '--device', 'cpu', '--threads', '1', '--json'])
    out = json.loads(capsys.readouterr().out)
    assert (out['model'], out['vs'], out['device'], out['threads']) == (MICRO, 'vit_micro_patch4_16', 'cpu', 1)
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
    assert both[2].split(' | ')[10] == '-'  # no per-trial img/s in this JSON


def test_perf_table_spread_is_over_trial_pairs(tmp_path) -> None:
    """The spread column: PE/dense of trial i of each model (run next to each other), min-max."""
    r = _bench_json(False, 0.9)
    r['results']['m_pe']['trials'], r['results']['m']['trials'] = [90.0, 80.0, 99.0], [100.0, 100.0, 90.0]
    (tmp_path / 'bench-a.json').write_text(json.dumps(r))
    row = perf_tables.bench_table(tmp_path).splitlines()[2]
    assert ' | 0.80-1.10 | ' in row


def test_resnet_pe_keeps_less_for_backward_than_dense():
    """The memory a training step keeps for backward: the PE ResNet (its stage entry recomputed)
    under its dense twin, fp32 and bf16; and the per-module table names the stage entry."""
    from rowcol.models import create_model
    x = torch.randn(8, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    for amp in (None, 'bf16'):
        sizes = {}
        for name in ('resnet26_pe_cifar', 'resnet26_cifar'):
            model = create_model(name).train().to(memory_format=torch.channels_last)
            sizes[name] = saved_tensors.saved_bytes(model, x, amp)
        assert sum(sizes['resnet26_pe_cifar'].values()) < sum(sizes['resnet26_cifar'].values()), amp
        pe_entries = [k for k in sizes['resnet26_pe_cifar'] if k.startswith(('layer3.', 'layer4.'))
                      and ('widen' in k or 'downsample' in k)]
        assert not pe_entries  # the PE stages' entries keep nothing: recomputed in backward
    live = saved_tensors.peak_live_bytes(create_model('resnet26_pe_cifar').train(), torch.randn(4, 3, 32, 32))
    assert live > sum(saved_tensors.saved_bytes(create_model('resnet26_pe_cifar').train(),
                                                 torch.randn(4, 3, 32, 32)).values())


def test_resnet_pe_recomputed_entry_never_holds_the_widenings_tensors_beside_its_gradient(monkeypatch):
    """The recomputation differentiates the widening on its own, after the rest of the entry: the peak
    of live tensors over a stage's training step is lower than with the widening in the same graph by
    about two tensors of the widened channels' size (asserted: 1.5), its conv and BN outputs no longer
    live beside the gradients of the widened channels; the gradients are the same (fp32, 1e-5)."""
    import rowcol.models.resnet as resnet
    from rowcol.models import create_model
    torch.manual_seed(0)
    stage = create_model('resnet26_pe_cifar').layer3.train()
    x = torch.randn(16, 128, 16, 16, requires_grad=True)

    def peak_and_grads():
        stage.zero_grad(set_to_none=True)
        x.grad = None
        peak = saved_tensors.peak_of(lambda: stage(x).square().sum().backward())
        return peak, [x.grad] + [p.grad for p in stage.parameters()]
    assert stage._recomputed_slots() is not None and resnet._plain_widening(stage)
    peak_and_grads()  # warm-up
    two, got = peak_and_grads()
    monkeypatch.setattr(resnet, '_plain_widening', lambda s: False)  # one graph for the whole entry
    one, want = peak_and_grads()
    new_channels = 16 * 128 * 16 * 16 * 4  # bytes of (B, C - C_in, H, W) in fp32
    assert one - two >= 1.5 * new_channels, (one, two)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_ab_switch_times_both_settings_and_restores_the_switch(monkeypatch, capsys):
    from rowcol.layers import PeAttention
    monkeypatch.setattr(sys, 'argv', ['ab_switch.py', '--model', MICRO, '--switch', 'rowcol.layers.PeAttention.fused_qkv',
                                      '--batch-size', '2', '--steps', '1', '--warmup', '1', '--repeats', '2'])
    ab_switch.main()
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row['img_per_s_on'] > 0 and row['img_per_s_off'] > 0 and row['repeats'] == 2
    assert PeAttention.fused_qkv is True
    monkeypatch.setattr(sys, 'argv', ['ab_switch.py', '--model', MICRO, '--switch', 'rowcol.layers.PeAttention.num_heads'])
    with pytest.raises(SystemExit, match='not a boolean'):
        ab_switch.main()


def test_depthwise_bf16_times_each_op_in_both_dtypes(monkeypatch, capsys, one_thread):
    monkeypatch.setattr(sys, 'argv', ['depthwise_bf16.py', '--channels', '4', '--size', '7', '--batch-size', '2',
                                      '--repeats', '1'])
    depthwise_bf16.main()
    out = json.loads(capsys.readouterr().out)
    for dtype in ('float32', 'bfloat16'):
        assert set(out[dtype]) == {'forward', 'input_grad', 'weight_grad', 'input_grad_as_conv_transpose'}
        assert all(v > 0 for v in out[dtype].values())


def test_saved_tensors_off_turns_a_switch_off_for_the_run_only(capsys):
    from rowcol.models.resnet import PeStage
    args = ['--model', 'resnet26_pe_cifar', '--batch-size', '4', '--top', '0']
    saved = {}
    for off in ([], ['--off', 'rowcol.models.resnet.PeStage.recompute_entry']):
        saved_tensors.main(args + off)
        line = capsys.readouterr().out.splitlines()[0]  # saved for backward, MB: pe X, dense Y
        saved[bool(off)] = float(line.split(',')[1].split()[-1])
    assert saved[True] > saved[False]  # without the recomputation the stage entries keep their tensors
    assert PeStage.recompute_entry is True
    with pytest.raises(SystemExit, match='--off rowcol.layers.PeAttention.num_heads: not a boolean'):
        saved_tensors.main(args + ['--off', 'rowcol.layers.PeAttention.num_heads'])


def test_op_count_sees_the_ops_a_switch_removes(capsys):
    """The recomputed stage entry runs its forward ops again in backward: turning it off lowers the PE
    model's count and leaves the dense twin's alone; an inference step dispatches fewer ops than a
    training step."""
    args = ['--model', 'resnet26_pe_cifar', '--batch-size', '2', '--json']
    runs = {}
    for name, extra in (('on', []), ('off', ['--off', 'rowcol.models.resnet.PeStage.recompute_entry']),
                        ('infer', ['--mode', 'infer'])):
        op_count.main(args + extra)
        runs[name] = json.loads(capsys.readouterr().out)['ops']
    assert runs['on']['resnet26_cifar'] == runs['off']['resnet26_cifar']
    assert runs['on']['resnet26_pe_cifar'] > runs['off']['resnet26_pe_cifar']
    assert 0 < runs['infer']['resnet26_pe_cifar'] < runs['off']['resnet26_pe_cifar']
    from rowcol.models.resnet import PeStage
    assert PeStage.recompute_entry is True
