"""One process per call: PE attention casting its input to bf16 once (PeAttention._project since
this change) against autocast casting it per projection (before), next to the dense twin,
interleaved rounds (new, old, dense in rotating order), bf16, eager.

    python docs/perf/gpu-cast/attn_ab.py [ROUNDS]

Prints one line per (model, mode): median ms/step of new, old and dense, and the ratios.
"""
import statistics
import sys

import torch

from rowcol.bench import _Runner
from rowcol.layers import PeAttention
from rowcol.models import dense_twin
from rowcol.runtime import resolve_device

new_project = PeAttention._project


def old_project(self, x):  # the three projections, autocast casting x for each
    if self.form == 'qo_kv':
        return self.q(x), self.kv(x), self.kv.forward_t(x)
    if self.form == 'qk_vo':
        return self.qk(x), self.qk.forward_t(x), self.vo(x)
    return self.q(x), self.k(x), self.vo(x)


rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 10
dev = resolve_device(None)
steps = 5 if dev.type == 'cuda' else 2
for name, batch in (('vit_pe_small_patch16_224', 128), ('vit_pe_tiny_patch4_32', 256)):
    if dev.type != 'cuda':
        batch //= 16
    for mode in ('infer', 'train'):
        kw = dict(mode=mode, device=dev, batch_size=batch, img_size=None, num_classes=None, amp='bf16',
                  compile=False, channels_last=False, optimizer='sgd')
        pe, dense = _Runner(name, **kw), _Runner(dense_twin(name), **kw)
        arms = {'new': (pe, new_project), 'old': (pe, old_project), 'dense': (dense, new_project)}
        times = {k: [] for k in arms}
        order = list(arms)
        for r in range(rounds + 1):
            for k in order[r % 3:] + order[:r % 3]:
                runner, project = arms[k]
                PeAttention._project = project
                t = runner.timed(runner.step, steps)
                if r:  # round 0 warms up every arm
                    times[k].append(1e3 * t / steps)
        PeAttention._project = new_project
        m = {k: statistics.median(v) for k, v in times.items()}
        print(f"{name} {mode} bf16 batch {batch} {dev} ({torch.cuda.get_device_name() if dev.type == 'cuda' else 'cpu'}), "
              f"{rounds} rounds x {steps} steps, median ms/step: new {m['new']:.2f}, old {m['old']:.2f}, "
              f"dense {m['dense']:.2f}; new/old time {m['new'] / m['old']:.3f}; PE/dense img/s new "
              f"{m['dense'] / m['new']:.3f}, old {m['dense'] / m['old']:.3f}", flush=True)
