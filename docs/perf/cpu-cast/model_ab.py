"""One process, one model: a bf16 training step of vit_pe_tiny_patch4_32 with Wᵀ applied as
x @ W (TiedLinear._apply_t, since e1cc459) and as F.linear(x, W.t()) (before), interleaved."""
import statistics
import sys
import time

import timm
import torch
import torch.nn.functional as F

import rowcol  # noqa: F401  (registers the models)
from rowcol.layers import TiedLinear

new_t = TiedLinear._apply_t


def old_t(self, x):
    return F.linear(x, self.weight.t(), self.bias_t)


torch.manual_seed(0)
model = timm.create_model('vit_pe_tiny_patch4_32').train()
opt = torch.optim.SGD(model.parameters(), lr=1e-3)
x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))


def step():
    with torch.autocast('cpu', torch.bfloat16):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


times = {'new': [], 'old': []}
reps = int(sys.argv[1]) if len(sys.argv) > 1 else 10
for r in range(reps + 1):
    for name in (('new', 'old') if r % 2 else ('old', 'new')):
        TiedLinear._apply_t = new_t if name == 'new' else old_t
        t0 = time.perf_counter()
        for _ in range(3):
            step()
        if r:  # the first round warms up both
            times[name].append((time.perf_counter() - t0) / 3)
n, o = statistics.median(times['new']), statistics.median(times['old'])
print(f'vit_pe_tiny_patch4_32 train bf16 batch 64, {reps} rounds x 3 steps: '
      f'new {1e3 * n:.0f} ms/step (min {1e3 * min(times["new"]):.0f}), old {1e3 * o:.0f} ms/step '
      f'(min {1e3 * min(times["old"]):.0f}), new/old time {n / o:.3f}')
