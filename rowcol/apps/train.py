"""Training: one loop that reads top to bottom.

``train(cfg, output)`` builds data, model, optimizer (timm ``create_optimizer_v2``: each
Parameter, so each shared W, sits in exactly one group), scheduler (timm, stepped per update),
optional EMA (timm ``ModelEmaV3`` over parameters, so a shared W is averaged once), and runs
``train_one_epoch`` and :func:`rowcol.apps.evaluate.evaluate` per epoch. Under ``torchrun`` it uses
DDP (gloo on CPU, nccl on GPU) with metrics all-reduced and only rank 0 writing, under the run
directory's lock. Checkpoints are atomic file by file, with ``train_state.pt`` written last (see
:class:`rowcol.apps.rundir.RunDir`), so a resume starts from the last whole checkpoint and redoes the
rest; SIGTERM / Ctrl-C finish the current step, write a resumable checkpoint and stop. A
non-finite loss or gradient skips the step on every rank, and no checkpoint takes weights that
have not given a finite loss; ``max_nonfinite`` in a row raise
:class:`~rowcol.errors.NonFiniteLossError` with the last good checkpoint intact and the commands
that resume or restart the run.

Where the loop stands is a :class:`TrainState`; its :meth:`~TrainState.to_dict` is the ``loop``
entry of ``train_state.pt``.
"""
from __future__ import annotations

import dataclasses
import json
import math
import shlex
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import Mixup
from timm.data.random_erasing import RandomErasing
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from tqdm import tqdm

from rowcol.apps import checkpoint as ckpt
from rowcol.apps.config import TrainConfig, resolve_config
from rowcol.errors import CheckpointError, ConfigError, NonFiniteLossError
from rowcol.apps.evaluate import evaluate
from rowcol.halve import halve
from rowcol.models import create_model, model_defaults, pe_spec
from rowcol.apps.pipeline import build_data, data_fingerprint, seed_step_rngs
from rowcol.apps.plots import plot_curves, read_metrics  # noqa: F401  (importable from here, as benchmarks/ do)
from rowcol.apps.rundir import RunDir, TensorBoard, load_run_config
from rowcol.apps.runtime import Dist, Stop, all_reduce_sum, autocast, barrier, init_distributed, stop_on_signals

__all__ = ['train', 'run_train', 'train_one_epoch', 'TrainState', 'TrainResult', 'Checkpointer', 'compute_loss',
           'distill_loss', 'train_command']


# ---------------------------------------------------------------------------- state

@dataclass
class TrainState:
    """Where the loop stands; updated in place by :func:`train_one_epoch` and :func:`train`.

    :meth:`to_dict` / :meth:`from_dict` are the ``loop`` entry of ``train_state.pt``: the
    eight keys of :attr:`SAVED`, as every run directory stores them. ``losses`` is not saved.
    """
    epoch: int = 0          # epochs completed
    batch: int = 0          # batches of the current epoch done
    step: int = 0           # steps taken (skipped ones too); the schedule's position
    best_top1: float = -1.  # the best validation top-1 so far
    nonfinite: int = 0      # non-finite losses (or gradients) in a row
    loss_sum: float = 0.    # the current epoch's training loss, summed over its images
    count: float = 0.       # ... and those images (all ranks)
    seconds: float = 0.     # the current epoch's training time so far
    losses: list[float] = field(default_factory=list)  # this rank's loss of each step this process took

    SAVED: ClassVar[tuple[str, ...]] = ('epoch', 'batch', 'step', 'best_top1', 'nonfinite', 'loss_sum', 'count',
                                        'seconds')

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.SAVED}

    @classmethod
    def from_dict(cls, loop: dict) -> TrainState:
        return cls(**{k: loop[k] for k in cls.SAVED if k in loop})

    def next_epoch(self) -> None:
        self.epoch, self.batch, self.loss_sum, self.count, self.seconds = self.epoch + 1, 0, 0., 0., 0.


@dataclass
class TrainResult:
    run_dir: Path
    status: str                       # finished | stopped (max_steps) | interrupted
    step_losses: list[float] = field(default_factory=list)
    metrics: list[dict] = field(default_factory=list)


@dataclass
class Checkpointer:
    """``save(state, rows=None, best=False)``: a checkpoint of the run at ``state``. Called on every
    rank, each of which refuses weights that are not finite; rank 0 writes (:meth:`RunDir.save_checkpoint`:
    weights, EMA, best, at an epoch's end metrics and curves, then train_state.pt, last)."""
    run: RunDir
    d: Dist
    model: nn.Module
    optimizer: torch.optim.Optimizer
    ema: ModelEmaV3 | None
    scaler: torch.amp.GradScaler | None
    meta: dict[str, str]  # safetensors metadata of the weights files

    def __call__(self, state: TrainState, rows: list[dict] | None = None, best: bool = False) -> None:
        if not _finite(self.model):
            raise NonFiniteLossError(f'the weights became inf or NaN by step {state.step}')
        if not self.d.main:
            return
        ema = self.ema.module if self.ema is not None else None
        self.run.save_checkpoint(self.model, {
            'model': self.model.state_dict(), 'optimizer': self.optimizer.state_dict(),
            'ema': ema.state_dict() if ema is not None else None,
            'scaler': self.scaler.state_dict() if self.scaler else None, 'loop': state.to_dict(),
        }, self.meta, ema=ema, best=best, rows=rows)


def _finite(model: nn.Module) -> bool:
    return bool(torch.stack([p.detach().isfinite().all() for p in model.parameters()]).all())


def _at_max_steps(cfg: TrainConfig, state: TrainState) -> bool:
    return bool(cfg.max_steps) and state.step >= cfg.max_steps  # None or 0: no limit


# ---------------------------------------------------------------------------- steps

def compute_loss(criterion: nn.Module, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return criterion(output.float(), target)


def distill_loss(loss: torch.Tensor, student: torch.Tensor, teacher: torch.Tensor, alpha: float,
                 tau: float) -> torch.Tensor:
    """``(1 - alpha) loss + alpha tau² KL(teacher/tau ‖ student/tau)`` (soft targets, as DeiT's soft distillation)."""
    kl = F.kl_div(F.log_softmax(student.float() / tau, dim=-1), F.log_softmax(teacher.float() / tau, dim=-1),
                  reduction='batchmean', log_target=True)
    return (1 - alpha) * loss + alpha * tau * tau * kl


def _forward(model: nn.Module, criterion: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig,
             device: torch.device, mixup=None, erasing=None, teacher: nn.Module | None = None) -> torch.Tensor:
    """The training loss of one batch: to the device, random erasing, Mixup/CutMix, autocast, distillation."""
    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    if cfg.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    if erasing is not None:
        x = erasing(x)
    if mixup is not None:
        x, y = mixup(x, y)
    with autocast(device, cfg.amp):
        out = model(x)
        loss = compute_loss(criterion, out, y)
        if teacher is not None:
            with torch.no_grad():
                soft = teacher(x)  # the same (augmented, mixed) images, the same autocast
            loss = distill_loss(loss, out, soft, cfg.distill_alpha, cfg.distill_tau)
    return loss


def _update(model: nn.Module, loss: torch.Tensor, optimizer, scaler, cfg: TrainConfig) -> bool:
    """Backward and optimizer step; False, with the weights untouched, if the gradient is not finite."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:  # GradScaler skips a non-finite step itself and lowers its scale
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        if cfg.clip_grad:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
        scaler.step(optimizer)
        scaler.update()
        return True
    loss.backward()
    # the norm of all gradients (DDP has averaged them: every rank decides alike); max_norm inf scales by 1.0
    norm = nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad or float('inf'))
    if not torch.isfinite(norm):
        return False
    optimizer.step()
    return True


def train_one_epoch(model, loader, optimizer, scheduler, criterion, cfg: TrainConfig, state: TrainState,
                    device: torch.device, d: Dist, ema=None, mixup=None, erasing=None, scaler=None,
                    save: Callable[[TrainState], None] = lambda state: None, progress: bool = True,
                    teacher=None) -> str | None:
    """One epoch from ``state.batch``, ``state`` updated in place; returns why it stopped early
    ('signal', 'max_steps') or None.

    A step whose loss or gradient is not finite is skipped. Checkpoints hold only weights that
    gave a finite loss: one due every ``cfg.save_every_steps`` is written at the next step, once
    its forward pass is finite, and dropped otherwise. Stops early, after saving, when a signal
    arrived on any process or at ``cfg.max_steps``.
    """
    model.train()
    bar = tqdm(total=len(loader), initial=state.batch, desc=f'epoch {state.epoch + 1}/{cfg.epochs}',
               disable=not (progress and d.main), unit='batch', dynamic_ncols=True)
    t0 = time.perf_counter()
    due = False  # a checkpoint of the current weights, waiting for their loss on the next batch
    stopped = None
    for x, y in loader.batches(state.epoch, state.batch):
        seed_step_rngs(cfg.seed, state.epoch, state.batch, d.rank)  # dropout, drop-path, mixup, erasing
        loss = _forward(model, criterion, x, y, cfg, device, mixup, erasing, teacher)
        loss_value = loss.item()
        # one collective per step: non-finite losses, stop requests and the loss sum of all ranks
        bad, stop, loss_sum, n = all_reduce_sum(
            [float(not torch.isfinite(loss)), float(Stop.signum is not None), loss_value * len(x), float(len(x))],
            d, device)
        if due and bad == 0:  # state still describes the weights before this step
            state.seconds += time.perf_counter() - t0
            t0 = time.perf_counter()
            save(state)
        due = False
        if bad == 0 and _update(model, loss, optimizer, scaler, cfg):
            if ema is not None:
                ema.update(model, step=state.step + 1)  # updates so far, this one included: only the first copies
            state.nonfinite = 0
            state.loss_sum += loss_sum
            state.count += n
        else:  # skipped on every rank alike
            state.nonfinite += 1
            if state.nonfinite >= cfg.max_nonfinite:
                bar.close()
                raise NonFiniteLossError(
                    f'{state.nonfinite} non-finite losses in a row (a loss or its gradient was inf or NaN; '
                    f'epoch {state.epoch + 1}, batch {state.batch})')
        state.step += 1
        state.batch += 1
        scheduler.step_update(num_updates=state.step)
        state.losses.append(loss_value)
        elapsed = state.seconds + time.perf_counter() - t0
        bar.update(1)
        bar.set_postfix(loss=f'{loss_value:.4f}', lr=f'{optimizer.param_groups[0]["lr"]:.2e}',
                        img_s=f'{state.count / max(elapsed, 1e-9):.0f}')
        stopped = 'signal' if stop > 0 else 'max_steps' if _at_max_steps(cfg, state) else None
        if stopped:
            state.seconds += time.perf_counter() - t0
            t0 = time.perf_counter()
            if state.nonfinite == 0:  # never the weights that just gave a non-finite loss
                save(state)
            break
        due = bool(cfg.save_every_steps) and state.step % cfg.save_every_steps == 0 and state.nonfinite == 0
    state.seconds += time.perf_counter() - t0
    bar.close()
    return stopped


def _validate(model: nn.Module, ema, loader, device: torch.device, cfg: TrainConfig, d: Dist) -> dict:
    """The validation columns of an epoch's metrics row."""
    t0 = time.perf_counter()
    val = evaluate(model, loader, device, cfg.amp, d, channels_last=cfg.channels_last)
    row = dict(val_loss=val['loss'], val_top1=val['top1'], val_top5=val['top5'])
    if ema is not None:
        row['ema_val_top1'] = evaluate(ema.module, loader, device, cfg.amp, d, channels_last=cfg.channels_last)['top1']
    row['eval_seconds'] = time.perf_counter() - t0
    return row


# ---------------------------------------------------------------------------- set-up

def _build_model(cfg: TrainConfig, num_classes: int, halved: bool = True) -> nn.Module:
    """The run's model, with fresh weights; with ``cfg.halve`` halved unless ``halved=False`` (for
    ``--init-from``, which halves the dense run's weights itself)."""
    try:
        model = create_model(cfg.model, img_size=cfg.img_size, num_classes=num_classes,
                             drop_path_rate=cfg.drop_path, **cfg.model_kwargs)
    except (TypeError, ValueError, KeyError, AssertionError, RuntimeError) as e:  # timm asserts on bad sizes
        raise ConfigError(f'--model {cfg.model} with --model-kwargs {json.dumps(cfg.model_kwargs)}: {e}') from None
    if cfg.halve and halved:
        halve(model, attn=cfg.halve_attn, init='scratch', use_scale=cfg.halve_scale)
    return model


def _init_from(cfg: TrainConfig, model: nn.Module, classes: list[str]) -> nn.Module:
    """The model of ``cfg`` built from the trained dense run ``cfg.init_from``, halved with init='dense'."""
    run = Path(cfg.init_from)
    saved = load_run_config(run)
    written = ckpt.read_json(run / ckpt.CONFIG)
    if saved.halve or pe_spec(saved.model) is not None:
        raise ConfigError(f'--init-from {run}: a PE run ({saved.model}{", halved" if saved.halve else ""}); '
                          'it takes a trained dense run')
    if (saved.model, saved.model_kwargs, saved.img_size) != (cfg.model, cfg.model_kwargs, cfg.img_size):
        raise ConfigError(f'--init-from {run}: the run trained {saved.model} with --model-kwargs '
                          f'{json.dumps(saved.model_kwargs)} (img_size {saved.img_size}), this run asks for '
                          f'{cfg.model} with {json.dumps(cfg.model_kwargs)} (img_size {cfg.img_size})')
    if written.get('classes') != classes:
        raise ConfigError(f'--init-from {run}: its classes {written.get("classes")} differ from the data\'s {classes}')
    ckpt.load_weights(model, run / ckpt.WEIGHTS)
    return halve(model, attn=cfg.halve_attn, init='dense', use_scale=cfg.halve_scale)


def _load_teacher(cfg: TrainConfig, classes: list[str], device: torch.device) -> nn.Module:
    """The frozen teacher of ``cfg.teacher``, in eval mode on ``device``; refused if it does not fit."""
    teacher, written = ckpt.load_run(cfg.teacher)
    if written.get('classes') != classes:
        raise ConfigError(f'--teacher {cfg.teacher}: its classes {written.get("classes")} differ from the '
                          f'data\'s {classes}')
    mine, theirs = model_defaults(cfg.model), model_defaults(written['model'])
    for key in ('mean', 'std'):
        if tuple(mine[key]) != tuple(theirs[key]):
            raise ConfigError(f'--teacher {cfg.teacher}: {written["model"]} normalises with {key} {theirs[key]}, '
                              f'{cfg.model} with {mine[key]}; both must see the same input')
    teacher.requires_grad_(False)
    return teacher.to(device).eval()


def _place(model: nn.Module, cfg: TrainConfig, device: torch.device) -> None:
    """``model`` onto ``device``, in channels_last if asked, with activation checkpointing if asked."""
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    if cfg.grad_checkpointing:
        from timm.layers import use_reentrant_ckpt
        if use_reentrant_ckpt():  # with shared weights and DDP, reentrant checkpointing corrupts gradients
            raise ConfigError('--grad-checkpointing: TIMM_REENTRANT_CKPT is set; rowcol needs non-reentrant '
                              'checkpointing, unset it')
        model.set_grad_checkpointing(True)


def _build_optim(cfg: TrainConfig, model: nn.Module, updates_per_epoch: int):
    try:
        optimizer = create_optimizer_v2(model, opt=cfg.opt, lr=cfg.scaled_lr(), weight_decay=cfg.weight_decay,
                                        momentum=cfg.momentum)
    except (ValueError, AssertionError, KeyError) as e:
        raise ConfigError(f'--opt {cfg.opt} (momentum {cfg.momentum}): {e}') from None
    try:
        scheduler, _ = create_scheduler_v2(optimizer, sched=cfg.sched, num_epochs=cfg.epochs,
                                           warmup_epochs=cfg.warmup_epochs, warmup_lr=cfg.warmup_lr,
                                           min_lr=cfg.min_lr, step_on_epochs=False,
                                           updates_per_epoch=updates_per_epoch)
    except (ValueError, AssertionError, KeyError) as e:
        raise ConfigError(f'--sched {cfg.sched}: {e}') from None
    if scheduler is None or not hasattr(scheduler, 'step_update') or cfg.sched == 'plateau':
        raise ConfigError(f'--sched {cfg.sched}: rowcol steps the schedule per update; use cosine, step, '
                          'multistep, poly or tanh')
    return optimizer, scheduler


def _build_criterion(cfg: TrainConfig, num_classes: int) -> tuple[Mixup | None, nn.Module]:
    if cfg.mixup > 0 or cfg.cutmix > 0:
        mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.label_smoothing,
                      num_classes=num_classes)
        return mixup, SoftTargetCrossEntropy()  # the smoothing is in Mixup's soft targets
    return None, nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)


def _check_log(cfg: TrainConfig) -> None:
    if cfg.log == 'tensorboard':
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise ConfigError('--log tensorboard needs the tensorboard package: pip install tensorboard') from None


def _resume(run: RunDir, d: Dist, model: nn.Module, optimizer, scheduler, ema, scaler) -> tuple[TrainState, list]:
    """Load the run's last checkpoint into the model, optimizer, EMA and scaler, move the schedule
    to its step; its loop state and the metrics rows it holds."""
    saved = run.load_state()
    try:
        model.load_state_dict(saved['model'])
        optimizer.load_state_dict(saved['optimizer'])
        if ema is not None and saved.get('ema') is not None:
            ema.module.load_state_dict(saved['ema'])
        if scaler is not None and saved.get('scaler'):
            scaler.load_state_dict(saved['scaler'])
    except (RuntimeError, ValueError, KeyError) as e:
        raise CheckpointError(f'{run.path / ckpt.STATE}: does not fit this run: {str(e).splitlines()[0]}') from None
    state = TrainState.from_dict(saved['loop'])
    # the schedule is rebuilt from the (possibly extended) config, then moved to the step reached
    scheduler.step_update(num_updates=state.step)
    # rows of epochs the checkpoint does not hold were written by a checkpoint that never completed
    rows = run.read_metrics()
    if any(r['epoch'] > state.epoch for r in rows):
        rows = [r for r in rows if r['epoch'] <= state.epoch]
        if d.main:
            run.write_metrics(rows)
    return state, rows


# ---------------------------------------------------------------------------- train

def train(cfg: TrainConfig, output: str | Path, resume: bool = False, overwrite: bool = False,
          progress: bool = True) -> TrainResult:
    """Train ``cfg`` into the run directory ``output`` (or continue it with ``resume``).

    Everything that can fail on user input (device, data, model arguments, optimizer,
    schedule) is checked before the run directory is touched; then the process that writes
    (rank 0) holds the directory's lock until it returns. ``cfg`` itself is not changed.
    """
    cfg = cfg.with_absolute_paths()  # also the config of the restart command of a diverged run
    try:
        return _train(cfg, RunDir(output), resume, overwrite, progress)
    except NonFiniteLossError as e:
        raise NonFiniteLossError(f'{e}; {_way_forward(cfg, Path(output))}') from None


def _train(cfg: TrainConfig, run: RunDir, resume: bool, overwrite: bool, progress: bool) -> TrainResult:
    # set-up: every check of the user's input, before the run directory is touched
    run.check(resume, overwrite)  # every rank raises alike; again under the lock
    _check_log(cfg)
    d, device = init_distributed(cfg.device)
    if cfg.amp == 'fp16' and device.type != 'cuda':
        raise ConfigError('--amp fp16 needs a CUDA device; use --amp bf16 on CPU')
    if (cfg.mixup > 0 or cfg.cutmix > 0) and (cfg.batch_size // d.world) % 2:
        raise ConfigError(f'Mixup/CutMix need an even batch per process; got {cfg.batch_size // d.world}')
    defaults = model_defaults(cfg.model)  # input size and normalisation of the model
    img_size = cfg.img_size or defaults['input_size'][-1]
    data = build_data(cfg.data_config(), img_size, defaults['mean'], defaults['std'], d,
                      progress=progress and d.main)
    num_classes = len(data.classes)
    torch.manual_seed(cfg.seed)  # the initial weights
    if cfg.init_from and not resume:  # a resumed run takes its weights from the state instead
        model = _init_from(cfg, _build_model(cfg, num_classes, halved=False), data.classes)
    else:
        model = _build_model(cfg, num_classes)
    teacher = _load_teacher(cfg, data.classes, device) if cfg.teacher else None
    if cfg.channels_last is None:  # CNNs run faster channels_last
        cfg = dataclasses.replace(cfg, channels_last=not hasattr(model, 'patch_embed'))
    _place(model, cfg, device)
    optimizer, scheduler = _build_optim(cfg, model, len(data.train))
    ema = ModelEmaV3(model, decay=cfg.ema_decay, exclude_buffers=True) if cfg.ema_decay else None
    scaler = torch.amp.GradScaler('cuda') if cfg.amp == 'fp16' else None
    mixup, criterion = _build_criterion(cfg, num_classes)
    erasing = None  # streamed data erases inside its transform
    if cfg.reprob > 0 and data.in_memory:
        erasing = RandomErasing(cfg.reprob, mode='pixel', device=str(device))

    with run.lock(resume, overwrite) if d.main else nullcontext():  # rank 0 writes, rank 0 locks
        # resume: the last whole checkpoint's weights, optimizer, schedule, loop state and metrics
        state, rows = _resume(run, d, model, optimizer, scheduler, ema, scaler) if resume else (TrainState(), [])
        train_model = model
        if d.world > 1:
            train_model = nn.parallel.DistributedDataParallel(
                model, device_ids=[d.local_rank] if device.type == 'cuda' else None)
        if cfg.compile:
            train_model = torch.compile(train_model)
        meta = {'model': cfg.model, 'num_classes': str(num_classes)}  # in the header of each weights file
        save = Checkpointer(run, d, model, optimizer, ema, scaler, meta)

        if d.main:
            if overwrite and not resume:
                run.clear()
            run.mark()  # first: from now on --overwrite may replace this folder
        board = TensorBoard(run) if d.main and cfg.log == 'tensorboard' else None
        if d.main and not resume:
            run.write_config(cfg, data.classes, d.world, device.type)
            if data.split is not None:
                run.write_split(data.split, data_fingerprint(cfg.data, data.split['num_samples']))
            if data.skipped:
                print(f'skipped {len(data.skipped)} bad image(s); listed in {run.write_skipped(data.skipped)}')

        # the epochs: train, then validate, log a metrics row and checkpoint
        result = TrainResult(run.path, 'finished', step_losses=state.losses)
        with stop_on_signals():
            while state.epoch < cfg.epochs and not _at_max_steps(cfg, state):
                stopped = train_one_epoch(train_model, data.train, optimizer, scheduler, criterion, cfg, state,
                                          device, d, ema, mixup, erasing, scaler, save, progress, teacher)
                if stopped == 'signal':
                    result.status = 'interrupted'
                if stopped and state.batch < len(data.train):
                    break  # stopped inside the epoch, checkpoint written
                row = dict(epoch=state.epoch + 1, step=state.step, train_loss=state.loss_sum / max(state.count, 1),
                           lr=optimizer.param_groups[0]['lr'], img_per_s=state.count / max(state.seconds, 1e-9),
                           seconds=state.seconds)
                if data.val is not None:
                    row.update(_validate(model, ema, data.val, device, cfg, d))
                # weights that just gave a non-finite training loss count as good only if validation confirms them
                unconfirmed = state.nonfinite > 0 and not math.isfinite(row.get('val_loss', math.nan))
                state.next_epoch()
                is_best = data.val is not None and row['val_top1'] > state.best_top1
                if is_best:
                    state.best_top1 = row['val_top1']
                rows.append(row)
                result.metrics.append(row)
                if unconfirmed:
                    print(f'epoch {row["epoch"]}: not checkpointed, its last training loss was not finite',
                          file=sys.stderr)
                else:
                    save(state, rows, is_best)
                    if board is not None:
                        board.log(row)
                if d.main and progress:
                    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}))
                if stopped:
                    break
            if result.status != 'interrupted' and state.epoch < cfg.epochs:
                result.status = 'stopped'
        if board is not None:
            board.close()
        barrier(d)
    return result


# ---------------------------------------------------------------------------- command line

def run_train(cfg: TrainConfig, output: str | Path, resume: bool = False, overwrite: bool = False,
              progress: bool = True) -> int:
    """``train`` for the command line: a message and an exit code for each way a run ends."""
    result = train(cfg, output, resume=resume, overwrite=overwrite, progress=progress)
    q = shlex.quote(str(result.run_dir))
    if result.status == 'interrupted':
        print(f'interrupted: checkpoint written; continue with: rowcol train --resume {q}')
        return 128 + (Stop.signum or signal.SIGINT)
    if result.status == 'stopped':
        print(f'stopped after {cfg.max_steps} steps; continue with: rowcol train --resume {q} '
              '--max-steps 0 (no limit) or a larger N')
    else:
        print(f'finished: {result.run_dir}')
    return 0


def _way_forward(cfg: TrainConfig, output: Path) -> str:
    """The commands that go on after a divergence: resume the last checkpoint, or start again."""
    restart = train_command(cfg, output, lr=float(f'{cfg.scaled_lr() / 2:.3g}'))
    if not RunDir(output).has_checkpoint():
        return (f'no checkpoint was written, so there is nothing to resume; start again with a lower learning rate: '
                f'{restart} (or with --clip-grad 1 in place of --lr)')
    return (f'the last good checkpoint is intact; continue from it, skipping more bad steps, with: rowcol train '
            f'--resume {shlex.quote(str(output))} --max-nonfinite {4 * cfg.max_nonfinite} (the same batches follow), '
            f'or start again with a lower learning rate: {restart}')


def train_command(cfg: TrainConfig, output: Path, **changes) -> str:
    """The ``rowcol train ... --overwrite`` command line that starts ``cfg`` (with ``changes``) in
    ``output`` again; flags only for the values that differ from its recipe, shell-quoted."""
    recipe = resolve_config(cfg.recipe)
    args = ['rowcol', 'train', '--recipe', cfg.recipe]
    for f in dataclasses.fields(cfg):
        value = changes.get(f.name, getattr(cfg, f.name))
        if f.name == 'recipe' or value is None or (f.name not in changes and value == getattr(recipe, f.name)):
            continue
        flag = '--' + f.name.replace('_', '-')
        if isinstance(value, bool):
            args.append(flag if value else f'--no-{flag[2:]}')
        else:
            args += [flag, json.dumps(value) if isinstance(value, dict) else str(value)]
    return shlex.join(args + ['--output', str(output), '--overwrite'])
