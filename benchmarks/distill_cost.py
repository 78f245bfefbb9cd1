"""What a teacher costs per training step: img/s of a student step with and without the frozen teacher's
forward, timed interleaved in one process (medians over repeats), as ``rowcol train --teacher`` runs it.

    python benchmarks/distill_cost.py --student vit_pe_nano_patch4_32 --teacher vit_nano_patch4_32 --batch-size 128
"""
import argparse
import json
import statistics
import time

import torch
import torch.nn as nn

import rowcol  # noqa: F401  (registers the models)
from rowcol.models import create_model
from rowcol.apps.runtime import autocast, resolve_device
from rowcol.apps.train import distill_loss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--student', default='vit_pe_nano_patch4_32')
    ap.add_argument('--teacher', default='vit_nano_patch4_32')
    ap.add_argument('--batch-size', type=int, default=128)
    ap.add_argument('--img-size', type=int, default=32)
    ap.add_argument('--steps', type=int, default=5, help='steps per timed block')
    ap.add_argument('--repeats', type=int, default=7)
    ap.add_argument('--amp', default='none')
    ap.add_argument('--device', default=None)
    a = ap.parse_args()
    dev = resolve_device(a.device)
    student = create_model(a.student, num_classes=10).to(dev).train()
    teacher = create_model(a.teacher, num_classes=10).to(dev).eval().requires_grad_(False)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
    x = torch.randn(a.batch_size, 3, a.img_size, a.img_size, device=dev)
    y = torch.randint(0, 10, (a.batch_size,), device=dev)
    ce = nn.CrossEntropyLoss(label_smoothing=0.1)

    def block(with_teacher: bool) -> float:
        if dev.type == 'cuda':
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(a.steps):
            with autocast(dev, a.amp):
                out = student(x)
                loss = ce(out.float(), y)
                if with_teacher:
                    with torch.no_grad():
                        soft = teacher(x)
                    loss = distill_loss(loss, out, soft, 0.5, 1.0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if dev.type == 'cuda':
            torch.cuda.synchronize()
        return a.steps * a.batch_size / (time.perf_counter() - t0)

    block(False), block(True)  # warm-up
    plain, kd = [], []
    for _ in range(a.repeats):
        plain.append(block(False))
        kd.append(block(True))
    res = dict(student=a.student, teacher=a.teacher, batch_size=a.batch_size, amp=a.amp, device=str(dev),
               img_per_s=round(statistics.median(plain), 1), img_per_s_teacher=round(statistics.median(kd), 1),
               ratio=round(statistics.median(kd) / statistics.median(plain), 3),
               ratio_per_repeat=[round(k / p, 3) for p, k in zip(plain, kd)], torch_threads=torch.get_num_threads())
    print(json.dumps(res))


if __name__ == '__main__':
    main()
