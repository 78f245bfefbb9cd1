"""rowcol's training step against a plain timm-style step, and data loading against the model.

    python benchmarks/loop_vs_timm.py --model vit_pe_nano_patch4_32 --steps 20 --repeats 3

Both loops train the same model on the same in-memory CIFAR-sized batches (random uint8 images,
so no files are needed): (a) ``rowcol.apps.train.train_one_epoch`` with its per-step seeding,
non-finite check, scheduler and progress accounting; (b) the bare step timm's train.py runs
(forward, loss, backward, optimizer step, scheduler step). Also times ``MemoryLoader`` alone
(decode-free batching, padded crop and flip, normalisation). Prints one JSON object.
"""
import argparse
import json
import platform
import statistics
import time

import torch
import torch.nn as nn
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2

from rowcol.apps.config import resolve_config
from rowcol.apps.data import MemoryData
from rowcol.models import create_model
from rowcol.apps.pipeline import BatchAugment, MemoryLoader
from rowcol.apps.runtime import Dist
from rowcol.apps.train import TrainState, train_one_epoch


def _setup(name: str, cfg, loader):
    torch.manual_seed(0)
    model = create_model(name, num_classes=10)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    opt = create_optimizer_v2(model, opt=cfg.opt, lr=cfg.scaled_lr(), weight_decay=cfg.weight_decay,
                              momentum=cfg.momentum)
    sched, _ = create_scheduler_v2(opt, sched='cosine', num_epochs=cfg.epochs, warmup_epochs=cfg.warmup_epochs,
                                   step_on_epochs=False, updates_per_epoch=len(loader))
    return model, opt, sched


def rowcol_loop(name, cfg, loader) -> float:
    model, opt, sched = _setup(name, cfg, loader)
    state = TrainState()
    t = time.perf_counter()
    train_one_epoch(model, loader, opt, sched, nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing), cfg, state,
                    torch.device('cpu'), Dist(), progress=False)
    return state.count / (time.perf_counter() - t)


def timm_loop(name, cfg, loader) -> float:
    model, opt, sched = _setup(name, cfg, loader)
    crit = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    model.train()
    n, t = 0, time.perf_counter()
    for step, (x, y) in enumerate(loader.batches(0)):
        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        loss = crit(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step_update(num_updates=step + 1)
        n += len(y)
    return n / (time.perf_counter() - t)


def data_only(loader) -> float:
    n, t = 0, time.perf_counter()
    for _, y in loader.batches(0):
        n += len(y)
    return n / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--model', default='vit_pe_nano_patch4_32')
    ap.add_argument('--recipe', default=None)
    ap.add_argument('--batch-size', type=int, default=128)
    ap.add_argument('--steps', type=int, default=20)
    ap.add_argument('--repeats', type=int, default=3)
    args = ap.parse_args()
    recipe = args.recipe or ('cifar_resnet' if 'resnet' in args.model else 'cifar_vit')
    cfg = resolve_config(recipe, model=args.model, batch_size=args.batch_size, max_steps=args.steps)
    cfg.channels_last = 'resnet' in args.model
    g = torch.Generator().manual_seed(0)
    n = args.batch_size * args.steps
    data = MemoryData(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g),
                      torch.randint(0, 10, (n,), generator=g), [str(i) for i in range(10)])
    loader = MemoryLoader(data, args.batch_size, True, 0, augment=BatchAugment(cfg.crop_padding, cfg.hflip))
    runs = {'rowcol': [], 'timm': [], 'data': []}
    for _ in range(args.repeats):  # interleaved
        runs['rowcol'].append(rowcol_loop(args.model, cfg, loader))
        runs['timm'].append(timm_loop(args.model, cfg, loader))
        runs['data'].append(data_only(loader))
    med = {k: statistics.median(v) for k, v in runs.items()}
    print(json.dumps(dict(model=args.model, batch_size=args.batch_size, steps=args.steps, repeats=args.repeats,
                          img_per_s={k: round(v, 1) for k, v in med.items()},
                          trials={k: [round(x, 1) for x in v] for k, v in runs.items()},
                          ratio_rowcol_over_timm=round(med['rowcol'] / med['timm'], 3),
                          threads=torch.get_num_threads(), torch=torch.__version__,
                          machine=f'{platform.machine()} {platform.processor()}'.strip())))


if __name__ == '__main__':
    main()
