"""One process: resnet50_pe bf16 inference (batch 16, channels_last, CPU autocast) with the stage-entry
depthwise conv in fp32 (what every CPU autocast forward did before a30d4aa) and in bf16 (what a
forward without grad does since), next to resnet50; rotating order, medians of ROUNDS rounds of 2 steps.

    python docs/perf/cpu-s5/ds_ab.py [ROUNDS]
"""
import statistics
import sys
import time

import timm
import torch

import rowcol  # noqa: F401  (registers the models)
from rowcol.models.resnet import PeStage

new = PeStage._downsample


def fp32(self, x):
    with torch.autocast('cpu', enabled=False):
        return self.downsample(x.float())


torch.manual_seed(0)
pe = timm.create_model('resnet50_pe').eval().to(memory_format=torch.channels_last)
dense = timm.create_model('resnet50').eval().to(memory_format=torch.channels_last)
x = torch.randn(16, 3, 224, 224).contiguous(memory_format=torch.channels_last)


def step(model):
    with torch.inference_mode(), torch.autocast('cpu', torch.bfloat16):
        model(x)


arms = {'fp32 conv': (pe, fp32), 'bf16 conv': (pe, new), 'dense': (dense, new)}
times = {k: [] for k in arms}
order = list(arms)
rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 10
for r in range(rounds + 1):
    for k in order[r % 3:] + order[:r % 3]:
        model, ds = arms[k]
        PeStage._downsample = ds
        t0 = time.perf_counter()
        step(model)
        step(model)
        if r:  # round 0 warms up every arm
            times[k].append((time.perf_counter() - t0) / 2 * 1e3)
PeStage._downsample = new
m = {k: statistics.median(v) for k, v in times.items()}
print(f"resnet50_pe bf16 infer batch 16, {torch.get_num_threads()} threads, {rounds} rounds x 2 steps, median ms/step: "
      + ', '.join(f'{k} {v:.1f}' for k, v in m.items())
      + f"; PE/dense img/s: fp32 conv {m['dense'] / m['fp32 conv']:.3f}, bf16 conv {m['dense'] / m['bf16 conv']:.3f}")
