"""Tied MLP forward+backward with Wᵀ as F.linear(x, W.t()) (old) and as x @ W (new), interleaved; docs/perf/cpu-cast/README.md."""
import time, statistics, torch, torch.nn.functional as F
torch.manual_seed(0)
M, d, h = 64 * 65, 192, 768
W = torch.nn.Parameter(torch.randn(h, d) * .02); b1 = torch.nn.Parameter(torch.zeros(h)); b2 = torch.nn.Parameter(torch.zeros(d))
x = torch.randn(64, 65, d)
def old_t(z): return F.linear(z, W.t(), b2)
def new_t(z):
    y = torch.addmm(b2, z.reshape(-1, z.shape[-1]), W); return y.view(*z.shape[:-1], d)
def step(ft, amp):
    with torch.autocast('cpu', torch.bfloat16, enabled=amp):
        y = ft(F.gelu(F.linear(x, W, b1)))
    y.float().sum().backward()
    W.grad = b1.grad = b2.grad = None
for amp in (False, True):
    ts = {'old': [], 'new': []}
    for f in (old_t, new_t):
        for _ in range(3): step(f, amp)
    for r in range(30):
        for name, f in (('old', old_t), ('new', new_t)) if r % 2 else (('new', new_t), ('old', old_t)):
            t0 = time.perf_counter(); step(f, amp); ts[name].append(time.perf_counter() - t0)
    o, n = statistics.median(ts['old']), statistics.median(ts['new'])
    print(f"amp={amp}: old {o*1e3:.2f} ms, new {n*1e3:.2f} ms, new/old time {n/o:.3f}")
