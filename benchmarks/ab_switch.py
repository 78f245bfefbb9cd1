"""Does an implementation switch pay? One model, a class attribute on and off, interleaved in one process.

    python benchmarks/ab_switch.py --model vit_pe_small_patch16_224 --switch rowcol.layers.PeAttention.fused_qkv \\
        --mode train --batch-size 16 --amp bf16 --repeats 9
    python benchmarks/ab_switch.py --model resnet26_pe_cifar --switch rowcol.models.resnet.PeStage.recompute_entry \\
        --mode train --batch-size 128 --channels-last --repeats 9

The switch is a boolean class attribute (``module.Class.attribute``) that changes how a model
computes, not what: the outputs and gradients are tested equal elsewhere. Each trial times
``--steps`` steps with the switch on, then off (order alternating between trials), on the same
model and input (:class:`rowcol.apps.bench.Runner`); prints one JSON line with the median img/s of
each, the ratio on/off and its spread over trials. On a busy machine use more ``--repeats``.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import statistics
import time
from collections.abc import Iterator

import torch

from rowcol.apps.bench import Runner, sync
from rowcol.apps.runtime import resolve_device


def switch(path: str, flag: str = '--switch') -> tuple[type, str]:
    """(class, attribute) of a boolean class switch named ``module.Class.attribute``."""
    module, cls, attr = path.rsplit('.', 2)
    owner = getattr(importlib.import_module(module), cls)
    if not isinstance(getattr(owner, attr, None), bool):
        raise SystemExit(f'{flag} {path}: not a boolean class attribute')
    return owner, attr


@contextlib.contextmanager
def turned_off(path: str | None, flag: str = '--off') -> Iterator[None]:
    """Within the block the boolean class switch ``path`` (``module.Class.attribute``) is False, and
    afterwards what it was; ``None``: nothing changes."""
    if path is None:
        yield
        return
    owner, attr = switch(path, flag)
    before = getattr(owner, attr)
    setattr(owner, attr, False)
    try:
        yield
    finally:
        setattr(owner, attr, before)


def model_and_input(name: str, batch_size: int, device: str = 'cpu',
                    channels_last: bool = False) -> tuple[torch.nn.Module, torch.Tensor]:
    """Model ``name`` (its default classes) on ``device`` and a random batch at its input size."""
    from rowcol.models import create_model
    from rowcol.stats import input_size_of
    model = create_model(name).to(device)
    x = torch.randn(batch_size, *input_size_of(model), device=device)
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    return model, x


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--model', required=True)
    p.add_argument('--switch', required=True, help='module.Class.attribute (a boolean)')
    p.add_argument('--mode', choices=['train', 'infer'], default='train')
    p.add_argument('--batch-size', type=int, default=32)
    p.add_argument('--amp', choices=['bf16'], default=None)
    p.add_argument('--channels-last', action='store_true')
    p.add_argument('--steps', type=int, default=3)
    p.add_argument('--warmup', type=int, default=2)
    p.add_argument('--repeats', type=int, default=7)
    p.add_argument('--threads', type=int, default=None)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    owner, attr = switch(a.switch)
    default = getattr(owner, attr)
    device = resolve_device(None)
    r = Runner(a.model, mode=a.mode, device=device, batch_size=a.batch_size, img_size=None, num_classes=None,
               amp=a.amp, compile=False, channels_last=a.channels_last, optimizer='sgd')
    times: dict[bool, list[float]] = {True: [], False: []}
    try:
        for value in (True, False):
            setattr(owner, attr, value)
            for _ in range(a.warmup):
                r.step()
        for trial in range(a.repeats):
            for value in ((True, False) if trial % 2 == 0 else (False, True)):
                setattr(owner, attr, value)
                sync(device)
                t0 = time.perf_counter()
                for _ in range(a.steps):
                    r.step()
                sync(device)
                times[value].append(a.steps * a.batch_size / (time.perf_counter() - t0))
    finally:
        setattr(owner, attr, default)
    ratios = [on / off for on, off in zip(times[True], times[False])]
    print(json.dumps({
        'model': a.model, 'switch': a.switch, 'mode': a.mode, 'amp': a.amp or 'fp32', 'batch_size': a.batch_size,
        'device': device.type, 'threads': torch.get_num_threads(), 'repeats': a.repeats, 'steps': a.steps,
        'img_per_s_on': statistics.median(times[True]), 'img_per_s_off': statistics.median(times[False]),
        'ratio_on_off': statistics.median(ratios), 'ratio_min': min(ratios), 'ratio_max': max(ratios)}))


if __name__ == '__main__':
    main()
