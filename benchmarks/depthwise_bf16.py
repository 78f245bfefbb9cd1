"""Why the ResNet-PE stage entry's strided depthwise conv runs in fp32 under CPU bf16 autocast.

    python benchmarks/depthwise_bf16.py                 # the CIFAR ResNet-PE's stage-3 entry, batch 128
    python benchmarks/depthwise_bf16.py --channels 512 --size 28 --batch-size 16   # ResNet-50-PE's

Times (median ms over ``--repeats``) of one 3×3 stride-2 depthwise convolution, channels_last, in
fp32 and in bf16: the forward, the input gradient and the weight gradient (``aten.convolution_backward``
with one output each), and the input gradient as a transposed convolution (what
``rowcol.models.resnet._UpcastDepthwise`` runs in fp32).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F


def median_ms(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--channels', type=int, default=128)
    p.add_argument('--size', type=int, default=16, help='input height and width')
    p.add_argument('--batch-size', type=int, default=128)
    p.add_argument('--repeats', type=int, default=15)
    p.add_argument('--threads', type=int, default=None)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    c, backward = a.channels, torch.ops.aten.convolution_backward
    res = {'channels': c, 'size': a.size, 'batch_size': a.batch_size, 'threads': torch.get_num_threads()}
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(a.batch_size, c, a.size, a.size).to(dtype).contiguous(memory_format=torch.channels_last)
        w = torch.randn(c, 1, 3, 3, dtype=dtype)
        y = F.conv2d(x, w, None, 2, 1, 1, c)
        g = torch.randn_like(y)
        extra = [x.shape[i] - ((y.shape[i] - 1) * 2 - 2 + 3) for i in (2, 3)]

        def grad(mask):
            return lambda: backward(g, x, w, None, (2, 2), (1, 1), (1, 1), False, (0, 0), c, mask)
        res[str(dtype).split('.')[-1]] = {
            'forward': round(median_ms(lambda: F.conv2d(x, w, None, 2, 1, 1, c), a.repeats), 3),
            'input_grad': round(median_ms(grad((True, False, False)), a.repeats), 3),
            'weight_grad': round(median_ms(grad((False, True, False)), a.repeats), 3),
            'input_grad_as_conv_transpose': round(median_ms(
                lambda: F.conv_transpose2d(g, w, None, 2, 1, extra, c), a.repeats), 3),
        }
    print(json.dumps(res, indent=1))


if __name__ == '__main__':
    main()
