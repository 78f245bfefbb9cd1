"""Tests for rowcol.apps.export: ONNX keeps each tied W once and matches torch; safetensors round trip."""
from __future__ import annotations

import argparse
import json
import os

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from rowcol.errors import CheckpointError, ConfigError, RowcolError
from rowcol.apps.checkpoint import load_run as _load_run
from rowcol.apps.export import add_arguments, check_onnx, export_model, onnx_max_abs_diff, run
from rowcol.layers import tied_modules
from rowcol.models import create_model, dense_twin
from rowcol.stats import count_params

PE_MODELS = ['vit_pe_micro_patch4_16', 'resnet26_pe_cifar']


pytestmark = pytest.mark.usefixtures('one_thread')


def _randomized(name: str, seed: int = 0) -> torch.nn.Module:
    """A model whose every weight and buffer holds distinct values (a fresh model has many
    all-zero biases / all-one norms, which the exporter stores once), in eval mode."""
    torch.manual_seed(seed)
    model = create_model(name)
    with torch.no_grad():
        for n, t in list(model.named_parameters()) + list(model.named_buffers()):
            if not t.is_floating_point():
                continue
            if n.endswith('running_var'):
                t.uniform_(0.5, 1.5)
            elif n.endswith(('bn1.weight', 'bn2.weight', 'bn3.weight')) or 'norm' in n and n.endswith('weight'):
                t.uniform_(0.5, 1.5)
            else:
                t.add_(torch.randn_like(t) * 0.02)
    return model.eval()


@pytest.fixture(scope='module')
def exported(tmp_path_factory) -> dict:
    """name -> (model, export info, onnx path) for each PE model and its dense twin."""
    out = tmp_path_factory.mktemp('onnx')
    res = {}
    for name in PE_MODELS + [dense_twin(n) for n in PE_MODELS]:
        model = _randomized(name)
        path = out / f'{name}.onnx'
        res[name] = (model, export_model(model, path, 'onnx'), path)
    return res


def _initializers(path) -> list[np.ndarray]:
    return [numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer]


@pytest.mark.parametrize('name', PE_MODELS)
def test_onnx_stores_each_tied_w_once(exported, name):
    model, info, path = exported[name]
    arrays = _initializers(path)
    tied = tied_modules(model)
    assert tied
    for mod_name, m in tied:
        w = m.weight.detach().numpy()
        as_w = sum(a.size == w.size and np.array_equal(a.ravel(), w.ravel()) for a in arrays)
        as_wt = sum(a.size == w.size and np.array_equal(a.ravel(), np.ascontiguousarray(w.T).ravel())
                    for a in arrays)
        assert as_w + as_wt == 1, (mod_name, as_w, as_wt)  # W once; no transposed copy
        assert info['tied'][f'{mod_name}.weight'] == 1
    # byte budget: every parameter once (BN may be fused into its conv), buffers at most once
    params4 = count_params(model) * 4
    init_bytes = sum(a.nbytes for a in arrays)
    assert init_bytes == info['initializer_bytes']
    assert 0.99 * params4 <= init_bytes <= 1.01 * (params4 + info['buffer_bytes']), (init_bytes, params4)


@pytest.mark.parametrize('name', PE_MODELS)
def test_onnxruntime_matches_torch_dynamic_batch(exported, name):
    model, info, path = exported[name]
    inp = onnx.load(str(path)).graph.input[0]
    assert not inp.type.tensor_type.shape.dim[0].HasField('dim_value')  # symbolic batch
    assert onnx_max_abs_diff(path, model, batch_sizes=(1, 3)) <= 1e-4


@pytest.mark.parametrize('name', PE_MODELS)
def test_pe_file_about_half_of_dense(exported, name):
    pe_model, pe_info, pe_path = exported[name]
    dense_model, dense_info, dense_path = exported[dense_twin(name)]
    size_ratio = os.path.getsize(pe_path) / os.path.getsize(dense_path)
    param_ratio = count_params(pe_model) / count_params(dense_model)
    assert abs(size_ratio - param_ratio) < 0.03, (size_ratio, param_ratio)
    assert size_ratio < 0.65
    assert pe_info['bytes'] == os.path.getsize(pe_path)


def test_check_onnx_rejects_a_transposed_copy(exported):
    model, info, path = exported['vit_pe_micro_patch4_16']
    proto = onnx.load(str(path))
    w = tied_modules(model)[0][1].weight.detach().numpy()
    proto.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w.T), 'w_t_copy'))
    with pytest.raises(RowcolError, match='more than once'):
        check_onnx(proto, model)


def test_check_onnx_rejects_excess_bytes(exported):
    model, info, path = exported['resnet26_pe_cifar']
    proto = onnx.load(str(path))
    proto.graph.initializer.append(numpy_helper.from_array(np.ones(20_000, np.float32), 'extra'))
    with pytest.raises(RowcolError, match='more than'):
        check_onnx(proto, model)


def test_refuse_overwrite(tmp_path):
    path = tmp_path / 'm.onnx'
    path.write_bytes(b'keep me')
    model = create_model('vit_pe_micro_patch4_16')
    for fmt in ('onnx', 'safetensors'):
        with pytest.raises(RowcolError, match='m.onnx'):
            export_model(model, path, fmt)
    assert path.read_bytes() == b'keep me'
    info = export_model(model, path, 'safetensors', overwrite=True)
    assert info['bytes'] == path.stat().st_size > 7
    assert sorted(os.listdir(tmp_path)) == ['m.onnx']  # no temp files left


def test_safetensors_round_trip(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_model

    for name in PE_MODELS:
        model = _randomized(name, seed=1)
        path = tmp_path / f'{name}.safetensors'
        info = export_model(model, path)  # format from the suffix
        assert info['format'] == 'safetensors' and info['bytes'] == path.stat().st_size
        with safe_open(str(path), 'pt') as f:
            meta = f.metadata()
        assert meta['rowcol_model'] == name and meta['num_classes'] == '10'
        fresh = create_model(name).eval()
        load_model(fresh, str(path), strict=True)
        x = torch.randn(2, *model.pretrained_cfg['input_size'])
        with torch.inference_mode():
            assert torch.equal(fresh(x), model(x))


def test_bad_format_and_opset(tmp_path):
    model = create_model('vit_pe_micro_patch4_16')
    with pytest.raises(ConfigError):
        export_model(model, tmp_path / 'm.bin')
    with pytest.raises(ConfigError):
        export_model(model, tmp_path / 'm.onnx', 'tflite')
    with pytest.raises(ConfigError):
        export_model(model, tmp_path / 'm.safetensors', opset=17)


def _run_dir(tmp_path, name: str = 'resnet26_pe_cifar', num_classes: int = 7):
    run_dir = tmp_path / 'run'
    run_dir.mkdir()
    model = create_model(name, num_classes=num_classes)
    export_model(model, run_dir / 'model.safetensors')
    (run_dir / 'config.json').write_text(json.dumps({'model': name, 'num_classes': num_classes, 'img_size': 32}))
    return run_dir, model


def _cli(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return run(p.parse_args(argv))


def test_cli_checkpoint_to_onnx(tmp_path, capsys):
    run_dir, model = _run_dir(tmp_path)
    out = tmp_path / 'out.onnx'
    assert _cli(['--checkpoint', str(run_dir), '--output', str(out), '--verify', '--json']) == 0
    info = json.loads(capsys.readouterr().out)
    assert info['max_abs_diff'] <= 1e-4
    assert info['format'] == 'onnx' and info['num_classes'] == 7 and info['bytes'] == out.stat().st_size
    assert info['params_bytes_ref'] == 4 * count_params(model)
    with pytest.raises(RowcolError, match='out.onnx'):
        _cli(['--checkpoint', str(run_dir), '--output', str(out)])


def test_cli_model_to_safetensors_prints_sizes(tmp_path, capsys):
    out = tmp_path / 'w.safetensors'
    assert _cli(['--model', 'vit_pe_micro_patch4_16', '--format', 'safetensors', '--output', str(out)]) == 0
    text = capsys.readouterr().out
    assert 'file size' in text and 'params x 4' in text and out.is_file()


def test_load_run_errors(tmp_path):
    with pytest.raises(CheckpointError, match='not a run directory'):
        _load_run(tmp_path / 'nope')
    with pytest.raises(CheckpointError, match='config.json'):
        _load_run(tmp_path)
    run_dir, _ = _run_dir(tmp_path)
    model, config = _load_run(run_dir)
    assert config['num_classes'] == 7 and model.num_classes == 7
    (run_dir / 'model.safetensors').write_bytes(b'\x00garbage')
    with pytest.raises(CheckpointError, match='model.safetensors'):
        _load_run(run_dir)
    (run_dir / 'model.safetensors').unlink()
    with pytest.raises(CheckpointError, match='model.safetensors'):
        _load_run(run_dir)
    (run_dir / 'config.json').write_text('{not json')
    with pytest.raises(CheckpointError, match='config.json'):
        _load_run(run_dir)


def test_load_run_wrong_classes(tmp_path):
    run_dir, _ = _run_dir(tmp_path)
    (run_dir / 'config.json').write_text(json.dumps({'model': 'resnet26_pe_cifar', 'num_classes': 5}))
    with pytest.raises(CheckpointError, match='model.safetensors'):
        _load_run(run_dir)
