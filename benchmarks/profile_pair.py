"""Where does a PE model's extra time go? torch.profiler on a PE model and its dense twin, op by op.

    python benchmarks/profile_pair.py --model resnet26_pe_cifar --mode train --batch-size 128 --channels-last
    python benchmarks/profile_pair.py --model resnet50_pe --vs resnet50_pe_untied --mode train --batch-size 16 \
        --channels-last --threads 2

Builds both models as ``rowcol bench`` does (random input, SGD in train mode), runs ``--warmup``
untimed steps, then profiles ``--steps`` steps of each and prints one table: per op, its self time
(CPU, or CUDA on a GPU) per step for each model and the difference, largest differences first,
plus the totals (on a GPU: device time, with each kernel also a row of its own, prefixed ``kernel:``;
the total counts each kernel once). Profiling adds overhead per op, so the totals run above ``rowcol bench``'s
times; the table is for finding the ops, ``rowcol bench`` for the ratio.
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from rowcol.apps.bench import Runner, sync
from rowcol.models import dense_twin
from rowcol.apps.runtime import resolve_device


KERNEL = 'kernel: '  # prefix of the rows of GPU kernels (the other rows are aten ops)


def op_times(name: str, *, mode: str, batch_size: int, amp: str | None, channels_last: bool,
             device: torch.device, warmup: int = 3, steps: int = 5) -> dict[str, float]:
    """Self time in ms per step of each op name over ``steps`` profiled steps of model ``name``."""
    r = Runner(name, mode=mode, device=device, batch_size=batch_size, img_size=None, num_classes=None,
               amp=amp, compile=False, channels_last=channels_last, optimizer='sgd')
    for _ in range(warmup):
        r.step()
    sync(device)
    cuda = device.type == 'cuda'
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            r.step()
        sync(device)
    times: dict[str, float] = defaultdict(float)
    for e in prof.key_averages():
        name = row_name(e, cuda)
        us = e.self_device_time_total if cuda else e.self_cpu_time_total
        if name and us:
            times[name] += us / 1e3 / steps
    return dict(times)


def row_name(e, cuda: bool) -> str | None:
    """The table row of a profiler event: on a GPU an aten op's self time is its kernels' time, so
    device events (kernels, copies, memsets) get rows of their own, prefixed :data:`KERNEL`, and the
    device-side copies of ``record_function`` ranges (the optimizer's step, say), which span kernels
    already counted, get none."""
    if not cuda or e.device_type == DeviceType.CPU:
        return e.key
    return None if e.is_user_annotation else f'{KERNEL}{e.key}'


def compare(pe: dict[str, float], dense: dict[str, float], rows: int = 25,
            names: tuple[str, str] = ('PE', 'dense')) -> str:
    """Markdown table of the ops whose per-step time differs most between the two models."""
    keys = sorted(set(pe) | set(dense), key=lambda k: (-abs(pe.get(k, 0.) - dense.get(k, 0.)), k))
    na, nb = names
    lines = [f'| op | {na} ms/step | {nb} ms/step | {na} - {nb} |', '|---|---|---|---|']
    for k in keys[:rows]:
        a, b = pe.get(k, 0.), dense.get(k, 0.)
        lines.append(f'| {k} | {a:.2f} | {b:.2f} | {a - b:+.2f} |')
    # the total counts each kernel once: over the kernel rows where there are any (GPU), else over all ops
    kernels = any(k.startswith(KERNEL) for k in keys)
    a, b = (sum(v for k, v in d.items() if k.startswith(KERNEL) or not kernels) for d in (pe, dense))
    lines.append(f"| **{'all kernels' if kernels else 'all ops'}** | {a:.1f} | {b:.1f} | {a - b:+.1f} |")
    return '\n'.join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--model', required=True)
    ap.add_argument('--vs', default=None, help="default: the model's dense twin")
    ap.add_argument('--mode', choices=['train', 'infer'], default='train')
    ap.add_argument('--batch-size', type=int, default=64)
    ap.add_argument('--amp', choices=['bf16'], default=None)
    ap.add_argument('--channels-last', action='store_true')
    ap.add_argument('--warmup', type=int, default=3)
    ap.add_argument('--steps', type=int, default=5)
    ap.add_argument('--rows', type=int, default=25)
    ap.add_argument('--threads', type=int, default=None)
    ap.add_argument('--device', default=None)
    ap.add_argument('--json', action='store_true', help='print both op-time dicts as JSON')
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    vs = a.vs or dense_twin(a.model)
    if vs is None:
        ap.error(f'--model {a.model} has no dense twin; name one with --vs')
    dev = resolve_device(a.device)
    kw = dict(mode=a.mode, batch_size=a.batch_size, amp=a.amp, channels_last=a.channels_last, device=dev,
              warmup=a.warmup, steps=a.steps)
    pe, dense = op_times(a.model, **kw), op_times(vs, **kw)
    if a.json:
        flags = {k: v for k, v in vars(a).items() if k not in ('model', 'vs', 'json', 'device', 'threads')}
        print(json.dumps(dict(model=a.model, vs=vs, device=str(dev), threads=torch.get_num_threads(), **flags,
                              model_ms=pe, vs_ms=dense), indent=1))
        return
    print(f'{a.model} vs {vs}, {a.mode}, batch {a.batch_size}, {a.amp or "fp32"}, {dev}, '
          f'{torch.get_num_threads()} threads, {a.steps} steps')
    print(compare(pe, dense, a.rows, names=(a.model, vs)))


if __name__ == '__main__':
    main()
