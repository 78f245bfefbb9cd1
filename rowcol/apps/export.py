"""``rowcol export``: a model (fresh or from a run directory) to ONNX or safetensors.

ONNX
----
Exported with the ``torch.export``-based exporter (``torch.onnx.export(dynamo=True)``; the
TorchScript exporter is deprecated since torch 2.9), opset ``opset`` (the exporter's default
when None), one input ``input`` of shape (batch, C, H, W) with a dynamic batch dimension and
one output ``logits``. The model is exported in eval mode: BatchNorm uses its running stats,
kept as initializers next to the conv weights (onnxruntime fuses them at load time).

The point of a PE model is that each shared W is stored once. A graph transposes weights in
several places: ``F.linear(x, W)`` on 3-D input becomes ``Transpose(W)`` + ``MatMul`` (in the PE
model's W maps and in every dense linear), and :class:`rowcol.layers.TiedLinear`'s NCHW ``conv_t``
reads ``W.t()`` (its other Wᵀ uses are ``x @ W`` since ``e1cc459``). How the exporters treat a
Transpose of a weight (measured on torch 2.14 / onnxscript 0.7, when every Wᵀ use was ``W.t()``):

* TorchScript exporter with ``do_constant_folding=True`` (its default) folds every
  ``Transpose(W)`` into a second, transposed initializer: a ViT-PE file doubles.
* TorchScript exporter without folding, and the dynamo exporter, keep ``Transpose`` nodes
  on the one W. But the dynamo exporter's optimizer (onnxscript) still folds a Transpose of
  an initializer if the initializer is small (<= 8192 elements) or the Transpose is its only
  consumer, so a small tied W could still be stored twice.

So export runs with ``optimize=False`` and then applies onnxscript's optimizer itself with a
``should_fold`` rule that never constant-folds a node reading a model weight or buffer:
shape arithmetic is still folded, but no Transpose/Unsqueeze of a weight becomes a stored
copy (the dense twin's ``Transpose(W)`` stays a node too; onnxruntime folds it in memory when
it loads the file). The optimizer's rewrite rules still fuse an eval BatchNorm into the conv
before it when that conv's weight has no other user (conv weight rescaled, a bias added: the
same bytes or fewer); a tied W has several users and is never fused, so BNs after PE convs
stay ``BatchNormalization`` nodes with their running stats. The optimizer also merges
initializers with identical values (e.g. the all-zero biases of a freshly initialised
model), so a file can be *smaller* than its parameters. Node metadata (stack traces with
local file paths, fx node dumps) is stripped; the model gets ``rowcol.*`` metadata (model
name, num_classes, input size, rowcol version).

After export the file is checked (:func:`check_onnx`), and a :class:`RowcolError` is raised
(nothing is written) when

* the initializers hold more than ``expected_bytes * 1.01 + 16 KiB``, where
  ``expected_bytes`` are the bytes of the model's distinct parameters plus its floating-point
  buffers (BN running mean/var; ``num_batches_tracked`` is not used in eval). That is an
  upper bound, right whether BN is kept (as here) or folded into the convs, and whether or
  not equal initializers were merged; the 16 KiB cover shape constants;
* any tied W (a :class:`TiedLinear` weight) appears more than once among the initializers,
  as W or as Wᵀ in any shape (found by value, not by name).

safetensors
-----------
``safetensors.torch.save_model`` of the model: its state dict, a tied W once, with metadata
``format=pt``, ``rowcol_model`` (timm name), ``num_classes`` and ``rowcol_version``.

Both formats are written atomically (a temp file in the output's directory, then a rename)
and refuse to replace an existing file unless ``overwrite=True``.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

import rowcol
from rowcol.apps.checkpoint import atomic_write, load_run
from rowcol.errors import ConfigError, RowcolError
from rowcol.layers import tied_modules
from rowcol.models import create_model
from rowcol.stats import count_params, input_size_of, tensor_bytes

__all__ = ['export_model', 'export_onnx_bytes', 'check_onnx', 'onnx_max_abs_diff', 'model_name_of',
           'FORMATS', 'add_arguments', 'run']

FORMATS = ('onnx', 'safetensors')
_SUFFIXES = {'.onnx': 'onnx', '.safetensors': 'safetensors'}
SIZE_TOLERANCE = 0.01  # relative slack on initializer bytes
SIZE_SLACK_BYTES = 16 * 1024  # absolute slack: shape constants and other small initializers
_PROTOBUF_LIMIT = 2 ** 31 - 1


# ----------------------------------------------------------------------------------------
# run directories

# ----------------------------------------------------------------------------------------
# helpers

def model_name_of(model: nn.Module) -> str | None:
    """The timm name a model was created with (None for a hand-built module)."""
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    return cfg.get('architecture')


def _num_classes_of(model: nn.Module) -> int | None:
    n = getattr(model, 'num_classes', None)
    return int(n) if isinstance(n, int) else None


def _expected_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes of the distinct parameters, bytes of the floating-point buffers)."""
    return tensor_bytes(model.parameters()), tensor_bytes(t for t in model.buffers() if t.is_floating_point())


def _check_output(path: Path, overwrite: bool) -> None:
    if path.is_dir():
        raise RowcolError(f'{path}: is a directory, expected a file name')
    if path.exists() and not overwrite:
        raise RowcolError(f'{path}: exists; pass --overwrite (overwrite=True) to replace it')


# ----------------------------------------------------------------------------------------
# ONNX

def _weight_names(model: nn.Module) -> set[str]:
    return {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}


def export_onnx_bytes(model: nn.Module, img_size: int | None = None, opset: int | None = None,
                      batch_size: int = 2) -> bytes:
    """The serialized ONNX model (see the module docstring for the settings)."""
    import onnx
    import onnxscript.optimizer

    input_size = input_size_of(model, img_size)
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device('cpu')
    x = torch.randn(batch_size, *input_size, device=device)
    names = _weight_names(model)
    was_training = model.training
    model.eval()
    try:
        program = torch.onnx.export(
            model, (x,), None, dynamo=True, optimize=False, external_data=False, verbose=False,
            input_names=['input'], output_names=['logits'], opset_version=opset,
            dynamic_shapes=({0: torch.export.Dim('batch')},))
    except Exception as e:  # the exporter raises many types; keep the cause chained
        raise RowcolError(f'ONNX export of {model_name_of(model) or type(model).__name__} failed: '
                          f'{type(e).__name__}: {e}') from e
    finally:
        model.train(was_training)

    def should_fold(node) -> bool | None:
        # Never fold a node that reads a weight: Transpose(W) would become a stored Wᵀ copy.
        for v in node.inputs:
            if v is not None and v.is_initializer() and v.name in names:
                return False
        return None  # onnxscript's default rules

    onnxscript.optimizer.optimize_ir(program.model, should_fold=should_fold)
    proto = program.model_proto
    for node in proto.graph.node:  # stack traces with local paths, fx dumps: not for shipping
        del node.metadata_props[:]
    meta = {'rowcol.model': model_name_of(model) or type(model).__name__,
            'rowcol.num_classes': _num_classes_of(model),
            'rowcol.input_size': list(input_size),
            'rowcol.version': rowcol.__version__}
    for k, v in meta.items():
        proto.metadata_props.add(key=k, value=json.dumps(v) if not isinstance(v, str) else v)
    onnx.checker.check_model(proto)
    data = proto.SerializeToString()
    if len(data) > _PROTOBUF_LIMIT:
        raise RowcolError('ONNX model over 2 GiB: external data files are not supported by rowcol export')
    return data


def _flat_forms(w: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """W and Wᵀ in row-major flat order: any stored copy of W (of any shape, e.g.
    ``W[:, :, None, None]``) or of Wᵀ equals one of them when flattened."""
    a = w.detach().cpu().numpy()
    return a.ravel(), np.ascontiguousarray(a.T).ravel()


def check_onnx(onnx_model: bytes | str | os.PathLike | onnx.ModelProto, model: nn.Module) -> dict:
    """Initializer bytes of an exported model against the torch model; raises on a copy.

    Returns ``initializers`` (count), ``initializer_bytes``, ``param_bytes``,
    ``buffer_bytes`` (floating-point buffers), ``expected_bytes`` (their sum),
    ``limit_bytes`` and ``tied`` (``{W name: copies of W or Wᵀ among the initializers}``).
    Raises RowcolError when the bytes exceed the limit or a tied W is stored more than once.
    """
    import onnx
    from onnx import numpy_helper

    if isinstance(onnx_model, bytes):
        proto = onnx.load_from_string(onnx_model)
    elif isinstance(onnx_model, (str, os.PathLike)):
        proto = onnx.load(os.fspath(onnx_model))
    else:
        proto = onnx_model
    arrays = [numpy_helper.to_array(t) for t in proto.graph.initializer]
    init_bytes = sum(a.nbytes for a in arrays)
    p_bytes, b_bytes = _expected_bytes(model)
    expected = p_bytes + b_bytes
    limit = int(expected * (1 + SIZE_TOLERANCE)) + SIZE_SLACK_BYTES
    tied = {}
    for name, m in tied_modules(model):
        w, wt = _flat_forms(m.weight)
        tied[f'{name}.weight'] = sum(
            1 for a in arrays
            if a.size == w.size and a.dtype == w.dtype
            and (np.array_equal(a.ravel(), w) or np.array_equal(a.ravel(), wt)))
    report = dict(initializers=len(arrays), initializer_bytes=init_bytes, param_bytes=p_bytes,
                  buffer_bytes=b_bytes, expected_bytes=expected, limit_bytes=limit, tied=tied)
    dup = {k: v for k, v in tied.items() if v > 1}
    if dup:
        raise RowcolError(f'ONNX export stores tied weights more than once (W and a copy of Wᵀ): {dup}')
    if init_bytes > limit:
        raise RowcolError(f'ONNX initializers hold {init_bytes:,} bytes, more than the model\'s '
                          f'{expected:,} (params {p_bytes:,} + float buffers {b_bytes:,}) + 1%: '
                          f'a weight was duplicated (constant-folded transpose?)')
    return report


def _compare(data: bytes | str | os.PathLike, model: nn.Module, batch_sizes, img_size: int | None,
             seed: int) -> tuple[float, float]:
    """(max |onnxruntime - torch|, max |torch|) over random inputs at each batch size."""
    import onnxruntime as ort

    src = data if isinstance(data, bytes) else os.fspath(data)
    so = ort.SessionOptions()
    so.intra_op_num_threads = max(1, torch.get_num_threads())
    sess = ort.InferenceSession(src, so, providers=['CPUExecutionProvider'])
    input_size = input_size_of(model, img_size)
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    worst = scale = 0.0
    try:
        for b in batch_sizes:
            x = torch.randn(b, *input_size, generator=g)
            with torch.inference_mode():
                ref = model(x.to(device)).float().cpu().numpy()
            out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
            if out.shape != ref.shape:
                raise RowcolError(f'ONNX output shape {out.shape} != torch {ref.shape} at batch {b}')
            worst = max(worst, float(np.abs(out - ref).max()))
            scale = max(scale, float(np.abs(ref).max()))
    finally:
        model.train(was_training)
    return worst, scale


def onnx_max_abs_diff(data: bytes | str | os.PathLike, model: nn.Module, batch_sizes=(1, 3),
                      img_size: int | None = None, seed: int = 0) -> float:
    """Max |onnxruntime - torch| over random inputs at each batch size (torch model in eval)."""
    return _compare(data, model, batch_sizes, img_size, seed)[0]


# ----------------------------------------------------------------------------------------
# the library entry point

def _resolve_format(path: Path, format: str | None) -> str:
    if format is None:
        fmt = _SUFFIXES.get(path.suffix.lower())
        if fmt is None:
            raise ConfigError(f"{path}: cannot tell the format from the suffix; give format "
                              f"(--format) {' or '.join(FORMATS)}")
        return fmt
    if format not in FORMATS:
        raise ConfigError(f"unknown export format '{format}', expected one of {FORMATS}")
    return format


def export_model(model: nn.Module | str, path: str | os.PathLike, format: str | None = None,
                 img_size: int | None = None, opset: int | None = None, overwrite: bool = False,
                 verify: bool = False) -> dict:
    """Write ``model`` (a module, or a model name for a fresh one) to ``path`` as ONNX or safetensors.

    ``format`` defaults to the one named by the suffix (.onnx / .safetensors). ONNX is
    checked before it is written (:func:`check_onnx`); with ``verify`` it is also run in
    onnxruntime at batch 1 and 3 against the torch model (RowcolError if the outputs differ
    by more than 1e-3 relative to the largest logit). Returns ``path``, ``format``,
    ``bytes`` (file size), ``params``, ``params_bytes_ref`` (params × 4) and, for ONNX, the
    :func:`check_onnx` numbers and ``max_abs_diff`` (with ``verify``).
    """
    path = Path(path)
    fmt = _resolve_format(path, format)
    if opset is not None and fmt != 'onnx':
        raise ConfigError('opset only applies to ONNX export')
    _check_output(path, overwrite)
    if isinstance(model, str):
        model = create_model(model, img_size=img_size)
    params = count_params(model)
    info: dict[str, Any] = dict(path=str(path), format=fmt, model=model_name_of(model),
                                num_classes=_num_classes_of(model), params=params, params_bytes_ref=params * 4)
    if fmt == 'onnx':
        data = export_onnx_bytes(model, img_size=img_size, opset=opset)
        info.update(check_onnx(data, model))
        if verify:
            diff, scale = _compare(data, model, (1, 3), img_size, seed=0)
            info['max_abs_diff'] = diff
            if diff > 1e-3 * max(1.0, scale):
                raise RowcolError(f'ONNX output differs from torch by {diff:.3g} (logit scale {scale:.3g})')

        def write(tmp: str) -> None:
            Path(tmp).write_bytes(data)
    else:
        from safetensors.torch import save_model
        meta = {'format': 'pt', 'rowcol_model': model_name_of(model) or type(model).__name__,
                'num_classes': str(_num_classes_of(model)), 'rowcol_version': rowcol.__version__}

        def write(tmp: str) -> None:
            save_model(model, tmp, metadata=meta)

    try:
        atomic_write(path, write, overwrite=overwrite)
    except FileExistsError:
        raise RowcolError(f'{path}: exists; pass --overwrite (overwrite=True) to replace it') from None
    info['bytes'] = path.stat().st_size
    return info


# ----------------------------------------------------------------------------------------
# command line

def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``rowcol export`` flags to ``parser``."""
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument('--checkpoint', metavar='RUN_DIR', help='training run directory (config.json + model.safetensors)')
    src.add_argument('--model', metavar='NAME', help='export a freshly initialised model of this name')
    parser.add_argument('--format', choices=FORMATS, default=None, help='output format (default: from --output suffix)')
    parser.add_argument('--output', required=True, metavar='FILE', help='file to write')
    parser.add_argument('--img-size', type=int, default=None,
                        help="square input size (default: the run's / model's own)")
    parser.add_argument('--num-classes', type=int, default=None, help='classifier size for --model')
    parser.add_argument('--opset', type=int, default=None, help="ONNX opset (default: the exporter's)")
    parser.add_argument('--verify', action='store_true', help='ONNX: compare onnxruntime with torch on random inputs')
    parser.add_argument('--overwrite', action='store_true', help='replace an existing output file')
    parser.add_argument('--json', action='store_true', help='print the result as JSON')


def _mb(n: int) -> str:
    return f'{n / 1e6:.2f} MB ({n:,} bytes)'


def run(args: argparse.Namespace) -> int:
    """Execute ``rowcol export`` from parsed arguments; prints the result, returns 0."""
    img_size = args.img_size
    if args.checkpoint:
        if args.num_classes is not None:
            raise ConfigError('--num-classes applies to --model; a run directory has its own')
        model, config = load_run(args.checkpoint)
        img_size = img_size or config.get('img_size')
    else:
        kwargs: dict[str, Any] = {}
        if args.num_classes is not None:
            kwargs['num_classes'] = args.num_classes
        model = create_model(args.model, img_size=img_size, **kwargs)
    info = export_model(model, args.output, args.format, img_size=img_size, opset=args.opset,
                        overwrite=args.overwrite, verify=args.verify)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"wrote {info['path']} ({info['format']}, {info['model']})")
    print(f"  file size:      {_mb(info['bytes'])}")
    print(f"  params x 4:     {_mb(info['params_bytes_ref'])}  ({info['params']:,} params)")
    if info['format'] == 'onnx':
        print(f"  initializers:   {_mb(info['initializer_bytes'])} in {info['initializers']}; "
              f"limit {info['limit_bytes']:,} (params + float buffers {info['buffer_bytes']:,}, +1%)")
        if info['tied']:
            print(f"  tied W:         {len(info['tied'])}, each stored once")
        if 'max_abs_diff' in info:
            print(f"  onnxruntime vs torch: max abs diff {info['max_abs_diff']:.3g}")
    return 0
