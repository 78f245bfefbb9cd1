"""Run by tests/test_distributed.py under torchrun: one DDP step of a model on a fixed global batch.

Rank 0 saves the all-reduced gradients and the weights after one SGD step to OUT.
"""
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import save_file

from rowcol.halve import halve
from rowcol.models import create_model


def global_batch(size: int):
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 3, size, size, generator=g), torch.randint(0, 10, (8,), generator=g)


def build(name: str) -> tuple[torch.nn.Module, int]:
    """The model (seed 0) and its input size; ``NAME+halved``: timm's NAME, one block a stage, halved."""
    torch.manual_seed(0)
    if name.endswith('+halved'):
        return halve(create_model(name.removesuffix('+halved'), num_classes=10, depths=(1, 1, 1, 1))), 64
    model = create_model(name, num_classes=10)
    return model, model.pretrained_cfg['input_size'][-1]


def main(name: str, out: str) -> None:
    dist.init_process_group('gloo')
    rank, world = dist.get_rank(), dist.get_world_size()
    model, size = build(name)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = global_batch(size)
    xs, ys = x.tensor_split(world)[rank], y.tensor_split(world)[rank]
    F.cross_entropy(ddp(xs), ys).backward()
    grads = {f'grad.{n}': p.grad.clone() for n, p in model.named_parameters()}
    opt.step()
    if rank == 0:
        weights = {f'weight.{n}': p.detach().clone() for n, p in model.named_parameters()}
        save_file({**grads, **weights}, out)
    dist.destroy_process_group()


if __name__ == '__main__':
    main(sys.argv[1], sys.argv[2])
