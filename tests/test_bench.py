"""Tests for rowcol.apps.bench: result structure, defaults and errors. Timings are never asserted."""
from __future__ import annotations

import argparse
import json

import pytest
import torch

from rowcol.apps.bench import Runner, add_arguments, bench, format_bench, format_copies, run, sync, weight_copy_ops
from rowcol.errors import ConfigError, ModelNameError
from rowcol.layers import PeAttention, tied_modules
from rowcol.models import create_model
from rowcol.stats import tensor_bytes

PE, DENSE = 'vit_pe_micro_patch4_16', 'vit_micro_patch4_16'
# One thread: on a busy shared CPU, two OpenMP threads can stall each other by orders of magnitude.
TINY = dict(batch_size=2, steps=1, repeats=2, warmup=1, latency_iters=2, device='cpu', threads=1)
TOP_KEYS = {'model', 'vs', 'mode', 'device', 'batch_size', 'img_size', 'amp', 'compile', 'results',
            'ratio_img_per_s', 'ratio_params', 'torch', 'threads', 'machine'}
RESULT_KEYS = {'img_per_s', 'img_per_s_min', 'img_per_s_max', 'params', 'macs', 'peak_mem_bytes'}


def _positive(r: dict, keys) -> None:
    for k in keys:
        assert isinstance(r[k], (int, float)) and r[k] > 0, (k, r[k])


@pytest.fixture(scope='module')
def infer_result() -> dict:
    return bench(PE, **TINY)


def test_infer_json_keys_and_positive_numbers(infer_result):
    res = infer_result
    assert TOP_KEYS <= set(res)
    assert res['model'] == PE and res['mode'] == 'infer' and res['device'] == 'cpu'
    assert res['batch_size'] == 2 and res['img_size'] == 16 and res['amp'] is None and res['compile'] is False
    assert set(res['results']) == {PE, DENSE}
    for r in res['results'].values():
        assert RESULT_KEYS | {'latency_p50_ms', 'latency_p90_ms'} <= set(r)
        _positive(r, RESULT_KEYS | {'latency_p50_ms', 'latency_p90_ms'})
        assert r['img_per_s_min'] <= r['img_per_s'] <= r['img_per_s_max']
        assert r['latency_p50_ms'] <= r['latency_p90_ms']
        assert len(r['trials']) == 2
    _positive(res, ['ratio_img_per_s', 'ratio_params', 'threads'])
    assert res['results'][PE]['params'] < res['results'][DENSE]['params']
    assert res['ratio_params'] == res['results'][PE]['params'] / res['results'][DENSE]['params']
    json.dumps(res)  # serialisable as is


def test_vs_defaults_to_dense_twin(infer_result):
    assert infer_result['vs'] == DENSE


def test_table_output(infer_result):
    text = format_bench(infer_result)
    assert PE in text and DENSE in text and 'img/s' in text


def test_model_without_twin_runs_alone():
    res = bench(DENSE, **TINY)
    assert res['vs'] is None and list(res['results']) == [DENSE]
    assert res['ratio_img_per_s'] is None and res['ratio_params'] is None


def test_vs_none_and_explicit_vs():
    assert bench(PE, vs='none', **TINY)['vs'] is None
    res = bench(DENSE, vs=PE, **TINY)
    assert res['vs'] == PE and res['ratio_params'] > 1


def test_train_mode_runs():
    res = bench('resnet26_pe_cifar', mode='train', batch_size=2, steps=1, repeats=1, warmup=1, device='cpu',
                threads=1)
    assert res['mode'] == 'train' and res['vs'] == 'resnet26_cifar' and res['optimizer'] == 'sgd'
    for r in res['results'].values():
        _positive(r, RESULT_KEYS)
        assert 'latency_p50_ms' not in r
        assert res['threads'] == 1
        assert r['state_bytes'] >= 2 * 4 * r['params']  # fp32 weights + SGD momentum


def test_train_adamw_bf16_channels_last():
    res = bench(PE, vs='none', mode='train', optimizer='adamw', amp='bf16', channels_last=True,
                batch_size=2, steps=1, repeats=1, warmup=1, device='cpu', threads=1)
    assert res['amp'] == 'bf16' and res['channels_last'] is True
    _positive(res['results'][PE], RESULT_KEYS)


def test_unknown_model():
    with pytest.raises(ModelNameError):
        bench('vit_pe_no_such_model', **TINY)
    with pytest.raises(ModelNameError):
        bench(PE, vs='no_such_dense_model', **TINY)


@pytest.mark.parametrize('kw', [dict(mode='eval'), dict(amp='fp8'), dict(steps=0), dict(batch_size=0),
                                dict(vs=PE), dict(optimizer='lion'), dict(device='tpu')])
def test_bad_settings(kw):
    with pytest.raises(ConfigError):
        bench(PE, **{**TINY, **kw})


def test_cli_json(capsys):
    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(['--model', PE, '--batch-size', '2', '--steps', '1', '--repeats', '1',
                         '--warmup', '1', '--latency-iters', '1', '--device', 'cpu', '--threads', '1', '--json'])
    assert run(args) == 0
    res = json.loads(capsys.readouterr().out)
    assert TOP_KEYS <= set(res) and res['vs'] == DENSE


def _tied_weight_copies(rep, name):
    tied = {f'{n}.weight' for n, _ in tied_modules(create_model(name))}
    return [op for phase in ('forward', 'train') for op in rep[phase]['ops'] if tied & set(op['weights'])]


def test_weight_copy_ops_linear_tie_copies_nothing():
    """Wᵀ is applied as x W, reading W in place: a ViT-PE step copies no tied weight."""
    rep = weight_copy_ops(PE, threads=1)
    assert rep['forward']['copies'] == 0 and not _tied_weight_copies(rep, PE)
    assert rep['step_ms'] > 0 and PE in format_copies(rep)


def test_bf16_autocast_casts_each_tied_weight_once_per_forward(monkeypatch):
    """W and Wᵀ share autocast's cached bf16 cast of the leaf W: one cast per tied W, not one per use.
    With Q, K, V fused, W_kv is cast only inside the concatenated operand (a (3d, d) tensor)."""
    tied = {f'{n}.weight' for n, _ in tied_modules(create_model(PE))}
    rep = weight_copy_ops(PE, amp='bf16', threads=1, timing_steps=1)
    casts = [op for op in rep['forward']['ops'] if tied & set(op['weights'])]  # matched by shape
    assert len(casts) == 8 and len(tied) == 12  # 4 blocks x (W_q for the output, MLP W)
    monkeypatch.setattr(PeAttention, 'fused_qkv', False)  # one GEMM per projection
    rep = weight_copy_ops(PE, amp='bf16', threads=1, timing_steps=1)
    casts = [op for op in rep['forward']['ops'] if tied & set(op['weights'])]
    assert len(casts) == len(tied) == 12  # 4 blocks x (W_q, W_kv, MLP W); one more per Wᵀ use before


def test_weight_copy_ops_conv_tie_copies_nothing_channels_last():
    # channels_last (the training default for CNNs): conv_t is a linear over the channel dim, no W copy
    rep = weight_copy_ops('resnet26_pe_cifar', timing_steps=1, threads=1, channels_last=True)
    assert rep['forward']['copies'] == 0 and not _tied_weight_copies(rep, 'resnet26_pe_cifar')


def test_tensor_bytes_counts_each_view_once():
    w, b = torch.zeros(4, 3), torch.zeros(5, dtype=torch.float64)
    assert tensor_bytes([w, w, w.view(4, 3), w.detach(), b]) == 48 + 40  # the same view of one storage: once
    assert tensor_bytes([w, w[:2]]) == 48 + 24  # another view counts its own bytes
    model = create_model(PE)
    uses = [m.weight for _, m in tied_modules(model) for _ in range(2)]  # each tied W, once per use
    assert tensor_bytes(uses) == sum(m.weight.numel() * 4 for _, m in tied_modules(model))


def test_runner_steps_and_state_bytes():
    r = Runner(PE, mode='train', device=torch.device('cpu'), batch_size=2, img_size=None, num_classes=None,
               amp=None, compile=False, channels_last=False, optimizer='sgd')
    r.step()
    sync(r.device)
    assert r.x.shape == (2, 3, 16, 16) and r.params == sum(p.numel() for p in r.model.parameters())
    state = list(r.model.parameters()) + [s['momentum_buffer'] for s in r.opt.state.values()]
    assert tensor_bytes(state) == 2 * 4 * r.params  # fp32 weights and SGD momentum, a tied W once each
