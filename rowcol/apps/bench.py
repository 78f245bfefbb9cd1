"""``rowcol bench``: throughput, latency and memory of a PE model next to its dense twin.

Both models are built in one process and measured *interleaved*: after warm-up, every
repeat times ``steps`` iterations of model A and then of model B, so slow drifts of the
machine (clock, other processes, thermal state) land on both. A model's ``img_per_s`` is
the median over repeats; ``img_per_s_min`` / ``img_per_s_max`` give the spread and
``trials`` lists every repeat. ``ratio_img_per_s`` is model over vs (PE over dense).

Modes: ``infer`` runs ``model.eval()`` under ``torch.inference_mode()`` and also times
batch-1 calls (``latency_p50_ms`` / ``latency_p90_ms``, the two models alternating);
``train`` runs a full step: forward, cross-entropy against random labels, backward,
optimizer step (SGD with momentum or AdamW), ``zero_grad(set_to_none=True)``.

Memory (``peak_mem_bytes``) is what one model needs for one step at the benchmark's batch:
``state_bytes`` (its weights, buffers and optimizer state, counted exactly from the tensors,
a tied W once) plus ``step_peak_bytes``, the peak growth of memory during one step (input
stays resident; activations, grads, temporaries) measured after both models are built and
warmed up, one model at a time, so neither pays the process' one-time costs (thread pools,
oneDNN caches). ``mem_method`` in the result says how the step peak was read:

* ``cuda_max_allocated``: ``torch.cuda.max_memory_allocated()`` after a peak reset, minus
  ``memory_allocated()`` before the step. Exact for the caching allocator.
* ``rss_hwm``: Linux ``VmHWM`` (peak resident set) from ``/proc/self/status`` after the peak
  mark is reset through ``/proc/self/clear_refs``, minus ``VmRSS`` before the step; glibc's
  ``malloc_trim(0)`` runs first so that memory freed by the other model's steps is given
  back and cannot be silently reused. Approximate (page granularity, allocator behaviour).
* ``rss_hwm_growth``: the same when ``clear_refs`` is not writable: only the growth of the
  process' all-time peak, 0 when an earlier phase peaked higher; a lower bound.

Global state: the RNG is forked and a thread count given with ``threads`` is restored
afterwards; on Linux the CPU memory probe resets this process' peak-RSS mark (``VmHWM``).

:func:`weight_copy_ops` answers "PE must not pay for the tie": it profiles one forward and
one forward+backward on the CPU and lists every copy op (``aten::copy_``) whose tensor has
the shape of a weight (up to transposition and 1-sized dims), with bytes and time.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import time
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

import rowcol  # noqa: F401  (registers models)
from rowcol.errors import ConfigError
from rowcol.halve import halve
from rowcol.models import create_model, dense_twin
from rowcol.apps.runtime import autocast, resolve_device
from rowcol.stats import count_macs, count_params, input_size_of, tensor_bytes

__all__ = ['bench', 'weight_copy_ops', 'format_bench', 'format_copies', 'add_arguments', 'run', 'Runner', 'sync',
           'MODES', 'DEFAULTS']

MODES = ('infer', 'train')
OPTIMIZERS = ('sgd', 'adamw')
NO_VS = 'none'  # ``vs='none'`` / ``--vs none``: bench the model alone even if it has a twin
DEFAULTS = dict(mode='infer', batch_size=64, repeats=5, warmup=3, steps=10, latency_iters=30,
                optimizer='sgd')


# ----------------------------------------------------------------------------------------
# building

HALVED = ' (halved)'  # a bench name ending in this: the timm model before it, through rowcol.halve


def _build(name: str, img_size: int | None, num_classes: int | None) -> nn.Module:
    kwargs: dict[str, Any] = {} if num_classes is None else {'num_classes': num_classes}
    if name.endswith(HALVED):
        return halve(create_model(name.removesuffix(HALVED), img_size=img_size, **kwargs))
    return create_model(name, img_size=img_size, **kwargs)


def sync(device: torch.device) -> None:
    """Wait for the queued work of ``device`` (CUDA); a no-op on the CPU."""
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def _machine(device: torch.device) -> str:
    cpu = platform.processor() or ''
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    cpu = line.split(':', 1)[1].strip()
                    break
    except OSError:
        pass
    s = f'{platform.platform()}; {cpu or platform.machine()}; {os.cpu_count()} cpus'
    if device.type == 'cuda':
        s += f'; {torch.cuda.get_device_name(device)}'
    return s


# ----------------------------------------------------------------------------------------
# memory

def _proc_status_kib(key: str) -> int | None:
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith(key + ':'):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _reset_hwm() -> bool:
    """Reset the peak-RSS mark of this process (Linux >= 4.0); False if not possible."""
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
        return True
    except OSError:
        return False


def _malloc_trim() -> None:
    """Give freed C heap pages back to the OS (glibc only; a no-op elsewhere)."""
    try:
        import ctypes
        ctypes.CDLL('libc.so.6').malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _step_peak(fn: Callable[[], None], device: torch.device) -> tuple[int | None, str | None]:
    """(peak memory growth while ``fn`` runs, method); see the module docstring."""
    gc.collect()
    if device.type == 'cuda':
        sync(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - start, 'cuda_max_allocated'
    _malloc_trim()
    reset = _reset_hwm()
    start = _proc_status_kib('VmRSS' if reset else 'VmHWM')
    fn()
    end = _proc_status_kib('VmHWM')
    if start is None or end is None:
        return None, None
    return max(0, end - start) * 1024, 'rss_hwm' if reset else 'rss_hwm_growth'


def _state_bytes(model: nn.Module, opt: torch.optim.Optimizer | None) -> int:
    """Bytes of the distinct weights, buffers and optimizer state tensors."""
    tensors = list(model.parameters()) + list(model.buffers())
    if opt is not None:
        tensors += [v for st in opt.state.values() for v in st.values() if torch.is_tensor(v)]
    return tensor_bytes(tensors)


# ----------------------------------------------------------------------------------------
# one model under test

class Runner:
    """One model under test, built as :func:`bench` builds it: on ``device`` with a random batch
    (and labels, and an optimizer in ``train`` mode); :meth:`step` runs one step of ``mode``,
    :meth:`one` one batch-1 inference call, :meth:`timed` seconds for ``n`` calls of a function."""

    def __init__(self, name: str, *, mode: str, device: torch.device, batch_size: int,
                 img_size: int | None, num_classes: int | None, amp: str | None,
                 compile: bool, channels_last: bool, optimizer: str) -> None:
        self.name = name
        self.mode = mode
        self.device = device
        self.batch_size = batch_size
        self.amp = amp
        model = _build(name, img_size, num_classes)
        self.input_size = input_size_of(model, img_size)
        self.num_classes = getattr(model, 'num_classes', None) or 1000
        self.params = count_params(model)
        self.macs = count_macs(model, self.input_size)  # on the CPU, before any compile
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        model = model.to(device=device, memory_format=fmt)
        model.train(mode == 'train')
        self.model = model
        # dynamic=False: the batch-N and batch-1 (latency) shapes each get their own static graph
        self.fn = torch.compile(model, dynamic=False) if compile else model
        self.x = torch.randn(batch_size, *self.input_size, device=device).contiguous(memory_format=fmt)
        self.x1 = self.x[:1].clone().contiguous(memory_format=fmt)
        self.y = torch.randint(0, self.num_classes, (batch_size,), device=device)
        self.opt = None
        if mode == 'train':
            if optimizer == 'sgd':
                self.opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
            else:
                self.opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)

    def step(self) -> None:
        if self.mode == 'infer':
            with torch.inference_mode(), autocast(self.device, self.amp):
                self.fn(self.x)
            return
        with autocast(self.device, self.amp):
            out = self.fn(self.x)
            loss = F.cross_entropy(out.float(), self.y)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def one(self) -> None:
        with torch.inference_mode(), autocast(self.device, self.amp):
            self.fn(self.x1)

    def timed(self, fn: Callable[[], None], n: int) -> float:
        sync(self.device)
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        sync(self.device)
        return time.perf_counter() - t0


def _percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100]."""
    s = sorted(values)
    if len(s) == 1:
        return s[0]
    k = (len(s) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def _check_int(name: str, value: int, low: int) -> None:
    if not isinstance(value, int) or value < low:
        raise ConfigError(f'{name} must be an integer >= {low}, got {value!r}')


def bench(
        model: str,
        vs: str | None = None,
        mode: str = DEFAULTS['mode'],
        batch_size: int = DEFAULTS['batch_size'],
        img_size: int | None = None,
        amp: str | None = None,
        compile: bool = False,
        channels_last: bool = False,
        repeats: int = DEFAULTS['repeats'],
        warmup: int = DEFAULTS['warmup'],
        steps: int = DEFAULTS['steps'],
        device: str | None = None,
        latency_iters: int = DEFAULTS['latency_iters'],
        optimizer: str = DEFAULTS['optimizer'],
        num_classes: int | None = None,
        threads: int | None = None,
        seed: int = 0,
        halved: bool = False,
) -> dict:
    """Benchmark ``model`` against ``vs`` (default: its dense twin; ``'none'``: alone).

    ``halved``: ``model`` is a dense timm model, benched halved (:func:`rowcol.halve`) against
    itself as it is (or against ``vs``).

    Returns the dict that ``rowcol bench --json`` prints: the settings, ``results`` with one
    entry per model (``img_per_s`` median over repeats, ``img_per_s_min``/``_max``, ``trials``,
    ``latency_p50_ms``/``latency_p90_ms`` in infer mode, ``params``, ``macs``, ``input_size``,
    ``peak_mem_bytes`` = ``state_bytes`` + ``step_peak_bytes``), ``ratio_img_per_s`` and
    ``ratio_params`` (model over vs, None without vs) and the environment (``torch``,
    ``threads``, ``machine``, ``mem_method``). ``threads`` sets torch's CPU thread count for
    the call (restored afterwards); on a shared, busy CPU fewer threads than cores avoid
    OpenMP threads stalling each other.
    Raises ``ModelNameError`` for an unknown name, ``ConfigError`` for a bad setting.
    """
    if mode not in MODES:
        raise ConfigError(f"unknown mode '{mode}', expected one of {MODES}")
    if amp not in (None, 'bf16'):
        raise ConfigError(f"unknown amp '{amp}', expected 'bf16' or none")
    if optimizer not in OPTIMIZERS:
        raise ConfigError(f"unknown optimizer '{optimizer}', expected one of {OPTIMIZERS}")
    for key, value, low in (('batch_size', batch_size, 1), ('repeats', repeats, 1), ('warmup', warmup, 0),
                            ('steps', steps, 1), ('latency_iters', latency_iters, 1)):
        _check_int(key, value, low)
    if img_size is not None:
        _check_int('img_size', img_size, 1)
    if threads is not None:
        _check_int('threads', threads, 1)
    if halved:
        model, vs = model + HALVED, model if vs is None else vs
    if vs is None:
        vs = dense_twin(model)
    elif vs.lower() == NO_VS:
        vs = None
    if vs == model:
        raise ConfigError(f"--vs is the model itself ('{model}'); give another model or 'none'")
    dev = resolve_device(device)

    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        cuda_ids = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == 'cuda' else []
        with torch.random.fork_rng(devices=cuda_ids):
            torch.manual_seed(seed)
            return _bench(model, vs, mode=mode, device=dev, batch_size=batch_size, img_size=img_size,
                          num_classes=num_classes, amp=amp, compile=compile, channels_last=channels_last,
                          repeats=repeats, warmup=warmup, steps=steps, latency_iters=latency_iters,
                          optimizer=optimizer)
    finally:
        torch.set_num_threads(old_threads)


def _bench(model: str, vs: str | None, *, mode: str, device: torch.device, batch_size: int,
           img_size: int | None, num_classes: int | None, amp: str | None, compile: bool,
           channels_last: bool, repeats: int, warmup: int, steps: int, latency_iters: int,
           optimizer: str) -> dict:
    names = [model] + ([vs] if vs else [])
    runners = [Runner(name, mode=mode, device=device, batch_size=batch_size, img_size=img_size,
                       num_classes=num_classes, amp=amp, compile=compile, channels_last=channels_last,
                       optimizer=optimizer) for name in names]
    for _ in range(max(1, warmup)):  # also compiles, and creates the optimizer state
        for r in runners:
            r.step()
    if mode == 'infer':
        for _ in range(max(1, min(warmup, 3))):
            for r in runners:
                r.one()
    mem: dict[str, tuple[int | None, int]] = {}
    method = None
    for r in runners:
        peak, method = _step_peak(r.step, device)
        mem[r.name] = (peak, _state_bytes(r.model, r.opt))

    trials: dict[str, list[float]] = {r.name: [] for r in runners}
    for _ in range(repeats):  # A, B, A, B, ...
        for r in runners:
            trials[r.name].append(steps * batch_size / r.timed(r.step, steps))
    lat: dict[str, list[float]] = {r.name: [] for r in runners}
    if mode == 'infer':
        for _ in range(latency_iters):
            for r in runners:
                lat[r.name].append(1e3 * r.timed(r.one, 1))

    results = {}
    for r in runners:
        t = trials[r.name]
        res: dict[str, Any] = dict(
            img_per_s=statistics.median(t), img_per_s_min=min(t), img_per_s_max=max(t),
            trials=t)
        if mode == 'infer':
            res['latency_p50_ms'] = _percentile(lat[r.name], 50)
            res['latency_p90_ms'] = _percentile(lat[r.name], 90)
        peak, state = mem[r.name]
        res.update(params=r.params, macs=r.macs, input_size=list(r.input_size),
                   peak_mem_bytes=None if peak is None else state + peak,
                   state_bytes=state, step_peak_bytes=peak)
        results[r.name] = res
    a = results[model]
    b = results[vs] if vs else None
    return dict(
        model=model, vs=vs, mode=mode, device=str(device), batch_size=batch_size,
        img_size=img_size or runners[0].input_size[1], amp=amp, compile=compile,
        channels_last=channels_last, repeats=repeats, warmup=warmup, steps=steps,
        optimizer=optimizer if mode == 'train' else None,
        results=results,
        ratio_img_per_s=a['img_per_s'] / b['img_per_s'] if b else None,
        ratio_params=a['params'] / b['params'] if b else None,
        torch=torch.__version__, threads=torch.get_num_threads(), machine=_machine(device),
        mem_method=method,
    )


# ----------------------------------------------------------------------------------------
# weight copies

_COPY_OPS = ('aten::copy_',)  # the op that moves data; clone/contiguous/_to_copy call it
_WRAPPER_OPS = ('aten::clone', 'aten::contiguous', 'aten::_to_copy', 'aten::to')


def _weight_keys(model: nn.Module) -> dict[tuple[int, ...], list[str]]:
    """Shape signature (sorted dims without 1s) of every >=2-D parameter -> its names."""
    keys: dict[tuple[int, ...], list[str]] = {}
    for n, p in model.named_parameters():
        if p.dim() >= 2:
            keys.setdefault(tuple(sorted(d for d in p.shape if d != 1)), []).append(n)
    return keys


def _profile_copies(fn: Callable[[], None], keys: dict) -> dict:
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    copies, wrappers = [], {}
    for e in prof.events():
        shapes = e.input_shapes or []
        if not shapes or not isinstance(shapes[0], (list, tuple)) or not shapes[0]:
            continue
        key = tuple(sorted(d for d in shapes[0] if d != 1))
        if key not in keys:
            continue
        if e.name in _COPY_OPS:
            numel = 1
            for d in shapes[0]:
                numel *= d
            copies.append(dict(shape=list(shapes[0]), numel=numel, weights=keys[key],
                               self_cpu_us=e.self_cpu_time_total))
        elif e.name in _WRAPPER_OPS:
            wrappers[e.name] = wrappers.get(e.name, 0) + 1
    return dict(copies=len(copies), numel=sum(c['numel'] for c in copies),
                time_ms=sum(c['self_cpu_us'] for c in copies) / 1e3, callers=wrappers, ops=copies)


def weight_copy_ops(
        model_name: str,
        batch_size: int = 3,
        img_size: int | None = None,
        channels_last: bool = False,
        amp: str | None = None,
        timing_steps: int = 3,
        num_classes: int | None = None,
        threads: int | None = None,
) -> dict:
    """Copies of weight-shaped tensors in one forward and one train step, on the CPU.

    Profiles (``torch.profiler``, CPU, shapes recorded) one ``forward`` and one
    ``forward + backward`` of ``model_name`` in train mode and keeps every ``aten::copy_``
    whose tensor has the shape of a >=2-D parameter up to transposition and 1-sized dims (so
    a copy of ``W.t()[:, :, None, None]`` counts as a copy of W). ``forward`` copies happen on
    every call; ``train`` copies also include the backward, where a copied tensor may be a
    gradient of W rather than W. ``bytes`` assume the parameter dtype (fp32; under
    ``amp='bf16'`` autocast's weight casts show up as ``aten::copy_`` too). ``time_ms`` is the
    profiler's self time of those copies, ``step_ms`` the median unprofiled forward+backward
    time over ``timing_steps`` steps, ``fraction`` their ratio. The batch size defaults to an
    odd 3 so that activations rarely share a weight's shape signature. ``threads`` sets
    torch's CPU thread count for the call (restored afterwards).
    """
    old_threads = torch.get_num_threads()
    if threads is not None:
        _check_int('threads', threads, 1)
        torch.set_num_threads(threads)
    try:
        return _weight_copy_ops(model_name, batch_size, img_size, channels_last, amp, timing_steps, num_classes)
    finally:
        torch.set_num_threads(old_threads)


def _weight_copy_ops(model_name: str, batch_size: int, img_size: int | None, channels_last: bool,
                     amp: str | None, timing_steps: int, num_classes: int | None) -> dict:
    if amp not in (None, 'bf16'):
        raise ConfigError(f"unknown amp '{amp}', expected 'bf16' or none")
    dev = torch.device('cpu')
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = _build(model_name, img_size, num_classes)
    input_size = input_size_of(model, img_size)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt).train()
    x = torch.randn(batch_size, *input_size).contiguous(memory_format=fmt)
    elem = next(model.parameters()).element_size()
    keys = _weight_keys(model)

    def fwd() -> torch.Tensor:
        with autocast(dev, amp):
            return model(x)

    def train_step() -> None:
        out = fwd()
        out.float().backward(torch.ones_like(out, dtype=torch.float32) / out.numel())
        model.zero_grad(set_to_none=True)

    train_step()  # warm-up: oneDNN primitive caches, allocator
    f = _profile_copies(lambda: fwd(), keys)
    t = _profile_copies(train_step, keys)
    times = []
    for _ in range(max(1, timing_steps)):
        t0 = time.perf_counter()
        train_step()
        times.append(time.perf_counter() - t0)
    step_ms = 1e3 * statistics.median(times)
    for d in (f, t):
        d['bytes'] = d['numel'] * elem
    return dict(model=model_name, batch_size=batch_size, input_size=list(input_size),
                channels_last=channels_last, amp=amp, params=count_params(model),
                forward=f, train=t, step_ms=step_ms,
                fraction=t['time_ms'] / step_ms if step_ms else None)


# ----------------------------------------------------------------------------------------
# output

def _si(v: float | None, unit: str = '') -> str:
    if v is None:
        return '-'
    for div, p in ((1e9, 'G'), (1e6, 'M'), (1e3, 'k')):
        if abs(v) >= div:
            return f'{v / div:.2f}{p}{unit}'
    return f'{v:.0f}{unit}' if isinstance(v, int) else f'{v:.3g}{unit}'


def format_bench(res: dict) -> str:
    """A readable table of :func:`bench` output."""
    head = (f"rowcol bench: mode={res['mode']} device={res['device']} batch={res['batch_size']} "
            f"img={res['img_size']} amp={res['amp'] or 'off'} compile={res['compile']} "
            f"channels_last={res['channels_last']} repeats={res['repeats']} steps={res['steps']} "
            f"threads={res['threads']} torch={res['torch']}")
    cols = ['model', 'img/s (median)', 'min', 'max']
    infer = res['mode'] == 'infer'
    if infer:
        cols += ['lat p50 ms', 'lat p90 ms']
    cols += ['params', 'MACs', 'peak mem']
    rows = []
    for name, r in res['results'].items():
        row = [name, f"{r['img_per_s']:.1f}", f"{r['img_per_s_min']:.1f}", f"{r['img_per_s_max']:.1f}"]
        if infer:
            row += [f"{r['latency_p50_ms']:.2f}", f"{r['latency_p90_ms']:.2f}"]
        row += [f"{r['params']:,}", _si(r['macs']), _si(r['peak_mem_bytes'], 'B')]
        rows.append(row)
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    lines = [head, '  '.join(c.ljust(w) for c, w in zip(cols, widths))]
    lines += ['  '.join(v.ljust(w) for v, w in zip(r, widths)) for r in rows]
    if res['vs']:
        lines.append(f"{res['model']} / {res['vs']}: img/s x{res['ratio_img_per_s']:.3f}, "
                     f"params x{res['ratio_params']:.3f}")
    lines.append(f"memory: {res['mem_method']}; machine: {res['machine']}")
    return '\n'.join(lines)


def format_copies(rep: dict) -> str:
    """One paragraph of :func:`weight_copy_ops` output."""
    f, t = rep['forward'], rep['train']
    return (f"{rep['model']} (batch {rep['batch_size']}, channels_last={rep['channels_last']}, "
            f"amp={rep['amp'] or 'off'}): forward {f['copies']} weight copies / {_si(f['bytes'], 'B')}; "
            f"forward+backward {t['copies']} / {_si(t['bytes'], 'B')} in {t['time_ms']:.3f} ms "
            f"of a {rep['step_ms']:.2f} ms step ({100 * (rep['fraction'] or 0):.2f}%)")


# ----------------------------------------------------------------------------------------
# command line

def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``rowcol bench`` flags to ``parser``."""
    d = DEFAULTS
    parser.add_argument('--model', required=True, help='model to measure (a PE model, usually)')
    parser.add_argument('--vs', default=None,
                        help="model to compare against (default: the dense twin; 'none': measure alone)")
    parser.add_argument('--mode', choices=MODES, default=d['mode'], help='inference or full train step')
    parser.add_argument('--batch-size', type=int, default=d['batch_size'], help='images per step')
    parser.add_argument('--img-size', type=int, default=None, help="square input size (default: the model's own)")
    parser.add_argument('--num-classes', type=int, default=None, help="classifier size (default: the model's own)")
    parser.add_argument('--amp', choices=['bf16'], default=None, help='bf16 autocast (CPU and CUDA)')
    parser.add_argument('--compile', action='store_true', help='torch.compile both models')
    parser.add_argument('--channels-last', action='store_true', help='channels_last model and input (CNNs)')
    parser.add_argument('--repeats', type=int, default=d['repeats'], help='timed trials per model, interleaved')
    parser.add_argument('--warmup', type=int, default=d['warmup'], help='untimed steps per model first')
    parser.add_argument('--steps', type=int, default=d['steps'], help='steps per timed trial')
    parser.add_argument('--latency-iters', type=int, default=d['latency_iters'],
                        help='batch-1 calls per model for the latency percentiles (infer)')
    parser.add_argument('--optimizer', choices=OPTIMIZERS, default=d['optimizer'], help='train mode optimizer')
    parser.add_argument('--threads', type=int, default=None, help='torch CPU threads (default: torch\'s)')
    parser.add_argument('--device', default=None, help='cpu or cuda (default: cuda if available)')
    parser.add_argument('--weight-copies', action='store_true',
                        help='instead of timing: profile one CPU step of each model and list copies of weights')
    parser.add_argument('--halve', action='store_true', help='--model is a dense timm model: bench it halved '
                        '(rowcol.halve) against itself')
    parser.add_argument('--json', action='store_true', help='print JSON instead of a table')


def run(args: argparse.Namespace) -> int:
    """Execute ``rowcol bench`` from parsed arguments; prints the result, returns 0."""
    if args.weight_copies:
        vs = dense_twin(args.model) if args.vs is None else (None if args.vs.lower() == NO_VS else args.vs)
        reps = [weight_copy_ops(n, img_size=args.img_size, channels_last=args.channels_last, amp=args.amp,
                                num_classes=args.num_classes, threads=args.threads)
                for n in [args.model] + ([vs] if vs else [])]
        print(json.dumps(reps, indent=2) if args.json else '\n'.join(format_copies(r) for r in reps))
        return 0
    res = bench(args.model, vs=args.vs, mode=args.mode, batch_size=args.batch_size, img_size=args.img_size,
                amp=args.amp, compile=args.compile, channels_last=args.channels_last, repeats=args.repeats,
                warmup=args.warmup, steps=args.steps, device=args.device, latency_iters=args.latency_iters,
                optimizer=args.optimizer, num_classes=args.num_classes, threads=args.threads,
                halved=args.halve)
    print(json.dumps(res, indent=2) if args.json else format_bench(res))
    return 0
