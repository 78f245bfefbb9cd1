"""Where does a model's training memory go? The tensors autograd saves for backward, per module.

    python benchmarks/saved_tensors.py --model resnet26_pe_cifar --vs resnet26_cifar --batch-size 128 --channels-last
    python benchmarks/saved_tensors.py --model resnet50_pe --vs resnet50 --batch-size 16 --channels-last --amp bf16
    python benchmarks/saved_tensors.py --model resnet26_pe_cifar --batch-size 128 --channels-last --peak
    python benchmarks/saved_tensors.py --model resnet26_pe_cifar --batch-size 128 --channels-last --peak \
        --off rowcol.models.resnet.PeStage.recompute_entry

Runs one training forward of each model (random input, train mode) under
``torch.autograd.graph.saved_tensors_hooks`` and counts every tensor saved for the backward
pass once (by storage), charged to the innermost module running when it was saved. Prints the
totals and the modules (names with block indices folded to ``*``) whose saved bytes differ most
between the two models. Saved tensors are most of a training step's peak memory beyond the
weights; ``rowcol bench --mode train`` reports the peak itself. ``--peak`` also reports the
peak of live tensors over one whole SGD training step (forward, backward, update), from
torch.profiler's memory timeline: unlike the process's resident memory, it leaves out memory the
allocator keeps after tensors are freed. ``--off module.Class.attribute`` measures both models with
that boolean class switch off (as ``ab_switch.py`` names it).
"""
from __future__ import annotations

import argparse
import json
import re
import tempfile
from collections import defaultdict
from collections.abc import Callable

import torch
import torch.nn as nn

import rowcol  # noqa: F401  (registers models)
from rowcol.models import dense_twin

from ab_switch import model_and_input, turned_off


def saved_bytes(model: nn.Module, x: torch.Tensor, amp: str | None = None) -> dict[str, int]:
    """Bytes saved for backward by one forward of ``model`` on ``x``, per module name (folded)."""
    stack: list[str] = ['(top)']
    seen: set[tuple[int, int]] = set()
    per: dict[str, int] = defaultdict(int)
    names = {m: re.sub(r'\.\d+(?=\.|$)', '.*', name).replace('.blocks.', '.') or '(top)'
             for name, m in model.named_modules()}
    # global module hooks: a hook on a module would change what it does (a PE stage entry with a
    # hooked module is not recomputed)
    hooks = [nn.modules.module.register_module_forward_pre_hook(
                 lambda mod, args: stack.append(names.get(mod, stack[-1])) and None),
             nn.modules.module.register_module_forward_hook(lambda mod, args, out: stack.pop() and None)]

    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.numel() == 0 or t.untyped_storage().data_ptr() in weights:
            return t  # weights (and views of them) are memory either way
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in seen:
            seen.add(key)
            per[stack[-1]] += t.untyped_storage().nbytes()
        return t

    dtype = torch.bfloat16 if amp == 'bf16' else None
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
            model(x).float().sum()
    finally:
        for h in hooks:
            h.remove()
    return dict(per)


def peak_of(fn: Callable[[], None], device: torch.device | str = 'cpu') -> int:
    """The most bytes of live tensors on ``device`` at any time during one call of ``fn``, from
    torch.profiler's memory timeline (memory the allocator caches is left out)."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.device(device).type == 'cuda' else [])
    with profile(activities=acts, profile_memory=True, record_shapes=True, with_stack=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        prof.export_memory_timeline(f'{tmp}/timeline.json', device=str(device))
        _, sizes = json.loads(open(f'{tmp}/timeline.json').read())
    return max(sum(s) for s in sizes)


def peak_live_bytes(model: nn.Module, x: torch.Tensor, amp: str | None = None) -> int:
    """The most bytes of live tensors at any time in the second of two SGD training steps."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    dtype = torch.bfloat16 if amp == 'bf16' else None
    y = torch.zeros(len(x), dtype=torch.long, device=x.device)

    def step() -> None:
        with torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
            loss = nn.functional.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    step()
    return peak_of(step, x.device)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--model', required=True)
    p.add_argument('--vs', help='model to compare with (default: the dense twin)')
    p.add_argument('--batch-size', type=int, default=32)
    p.add_argument('--channels-last', action='store_true')
    p.add_argument('--amp', choices=['bf16'], default=None)
    p.add_argument('--top', type=int, default=15)
    p.add_argument('--peak', action='store_true', help='also the peak of live tensors over a training step')
    p.add_argument('--off', metavar='SWITCH', help='a boolean class switch (module.Class.attribute) to turn off')
    p.add_argument('--device', default='cpu')
    a = p.parse_args(argv)
    vs = a.vs or dense_twin(a.model)
    if vs is None:
        p.error(f'--model {a.model} has no dense twin; pass --vs')
    torch.manual_seed(0)
    res, peak = {}, {}
    with turned_off(a.off):
        for name in (a.model, vs):
            model, x = model_and_input(name, a.batch_size, a.device, a.channels_last)
            res[name] = saved_bytes(model.train(), x, a.amp)
            if a.peak:
                peak[name] = peak_live_bytes(model, x, a.amp)
    mb = lambda b: b / 2 ** 20  # noqa: E731
    print(f'saved for backward, MB: {a.model} {mb(sum(res[a.model].values())):.1f}, '
          f'{vs} {mb(sum(res[vs].values())):.1f}')
    if a.peak:
        print(f'peak live tensors over a training step, MB: {a.model} {mb(peak[a.model]):.1f}, {vs} {mb(peak[vs]):.1f}')
    keys = set(res[a.model]) | set(res[vs])
    diff = sorted(keys, key=lambda k: -abs(res[a.model].get(k, 0) - res[vs].get(k, 0)))
    print(f'| module | {a.model} MB | {vs} MB |\n|---|---|---|')
    for k in diff[:a.top]:
        print(f'| {k} | {mb(res[a.model].get(k, 0)):.1f} | {mb(res[vs].get(k, 0)):.1f} |')


if __name__ == '__main__':
    main()
