"""Where a run executes: the device, the torchrun process group (rank 0 writes), and the signals
that ask it to stop."""
from __future__ import annotations

import os
import signal
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

from rowcol.errors import ConfigError

__all__ = ['Dist', 'resolve_device', 'autocast', 'init_distributed', 'all_reduce_sum', 'barrier', 'Stop',
           'stop_on_signals']


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def resolve_device(device: str | None) -> torch.device:
    """``cpu`` / ``cuda`` / ``cuda:N``; default cuda when available. ConfigError otherwise."""
    if device is None:
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ConfigError(f"bad device '{device}': {e}") from None
    if dev.type not in ('cpu', 'cuda'):
        raise ConfigError(f"device '{device}': only cpu and cuda are supported")
    if dev.type == 'cuda' and not torch.cuda.is_available():
        raise ConfigError(f"device '{device}' asked for, but CUDA is not available")
    return dev


def autocast(device: torch.device, amp: str | None):
    """Mixed precision for ``amp`` in (None, 'none', 'bf16', 'fp16'); a no-op for none."""
    if amp in (None, 'none'):
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == 'bf16' else torch.float16)


def init_distributed(device: str | None) -> tuple[Dist, torch.device]:
    """Join the torchrun process group if WORLD_SIZE > 1 (nccl on CUDA, gloo on CPU)."""
    dev = resolve_device(device)
    world = int(os.environ.get('WORLD_SIZE', '1'))
    if world == 1:
        return Dist(), dev
    local = int(os.environ.get('LOCAL_RANK', '0'))
    if not dist.is_initialized():
        dist.init_process_group('nccl' if dev.type == 'cuda' else 'gloo')
    if dev.type == 'cuda':
        torch.cuda.set_device(local)
        dev = torch.device(f'cuda:{local}')
    return Dist(dist.get_rank(), world, local), dev


def all_reduce_sum(values: list[float], d: Dist, device: torch.device) -> list[float]:
    if d.world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def barrier(d: Dist) -> None:
    if d.world > 1:
        dist.barrier()


class Stop:
    """Set by SIGTERM/SIGINT while :func:`stop_on_signals` is active; the training loop checks it
    after every step."""
    signum: int | None = None


@contextmanager
def stop_on_signals():
    """SIGTERM and SIGINT set :attr:`Stop.signum` (instead of ending the process) while active."""
    Stop.signum = None
    handler = lambda signum, frame: setattr(Stop, 'signum', signum)  # noqa: E731
    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
