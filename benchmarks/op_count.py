"""How many ops does one step dispatch? PE model against its dense twin, per aten op.

    python benchmarks/op_count.py --model resnet26_pe_cifar --mode train --batch-size 128 --channels-last --amp bf16
    python benchmarks/op_count.py --model vit_pe_tiny_patch4_32 --mode infer --batch-size 256 --device cuda --amp bf16
    python benchmarks/op_count.py --model resnet26_pe_cifar --mode train --off rowcol.models.resnet.PeStage.recompute_entry

Counts the aten ops that reach the Python dispatch key (``TorchDispatchMode``, below autograd and
autocast) during the second of two steps of each model; an op called inside another op is not
counted again. A training step is forward, backward and an SGD update with the foreach kernels (the
GPU's default, so that CPU counts of the update match a GPU's); an inference step is a
``torch.no_grad`` forward in eval mode (``rowcol bench`` uses ``inference_mode``, under which view
ops do not reach this counter). Views and metadata ops count like kernels. Where a GPU step is bound
by the host rather than by kernel time (small models, eager), its time follows the ops it launches,
not the MACs. Prints the totals and the ops whose counts differ most; ``--json`` prints them as
JSON. ``--off module.Class.attribute`` counts both models with that boolean class switch off.
"""
from __future__ import annotations

import argparse
import json
from collections import Counter

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

import rowcol  # noqa: F401  (registers models)
from rowcol.models import dense_twin

from ab_switch import model_and_input, turned_off


class _Counter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def step_ops(model: nn.Module, x: torch.Tensor, mode: str, amp: str | None = None) -> Counter[str]:
    """The aten ops (name -> count) of the second of two steps of ``model`` on ``x``."""
    dtype = torch.bfloat16 if amp == 'bf16' else None
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, foreach=True) if mode == 'train' else None
    model.train(mode == 'train')

    def step() -> None:
        with torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None), \
                torch.set_grad_enabled(mode == 'train'):
            out = model(x)
        if opt is not None:
            out.float().logsumexp(-1).mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    step()
    with _Counter() as c:
        step()
    return c.ops


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--model', required=True)
    p.add_argument('--vs', help='model to compare with (default: the dense twin)')
    p.add_argument('--mode', choices=['train', 'infer'], default='train')
    p.add_argument('--batch-size', type=int, default=8)
    p.add_argument('--channels-last', action='store_true')
    p.add_argument('--amp', choices=['bf16'], default=None)
    p.add_argument('--device', default='cpu')
    p.add_argument('--top', type=int, default=15)
    p.add_argument('--off', metavar='SWITCH', help='a boolean class switch (module.Class.attribute) to turn off')
    p.add_argument('--json', action='store_true')
    a = p.parse_args(argv)
    vs = a.vs or dense_twin(a.model)
    if vs is None:
        p.error(f'--model {a.model} has no dense twin; pass --vs')
    counts = {}
    with turned_off(a.off):
        for name in (a.model, vs):
            torch.manual_seed(0)
            counts[name] = step_ops(*model_and_input(name, a.batch_size, a.device, a.channels_last), a.mode, a.amp)
    pe, de = counts[a.model], counts[vs]
    diff = sorted(set(pe) | set(de), key=lambda k: (-abs(pe[k] - de[k]), k))[:a.top]
    if a.json:
        print(json.dumps({'model': a.model, 'vs': vs, 'mode': a.mode, 'amp': a.amp, 'device': a.device,
                          'batch_size': a.batch_size, 'channels_last': a.channels_last, 'off': a.off,
                          'ops': {a.model: sum(pe.values()), vs: sum(de.values())},
                          'by_op': {k: [pe[k], de[k]] for k in diff}}, indent=1))
        return
    print(f'ops per {a.mode} step: {a.model} {sum(pe.values())}, {vs} {sum(de.values())}')
    print(f'| op | {a.model} | {vs} |\n|---|---|---|')
    for k in diff:
        print(f'| {k} | {pe[k]} | {de[k]} |')


if __name__ == '__main__':
    main()
