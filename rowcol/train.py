"""Training and evaluation: one loop that reads top to bottom.

``train(cfg, output)`` builds data, model, optimizer (timm ``create_optimizer_v2``: each
Parameter, so each shared W, sits in exactly one group), scheduler (timm, stepped per update),
optional EMA (timm ``ModelEmaV3`` over parameters, so a shared W is averaged once), and runs
``train_one_epoch`` / ``evaluate`` per epoch. Under ``torchrun`` it uses DDP (gloo on CPU,
nccl on GPU) with metrics all-reduced and only rank 0 writing, under the run directory's lock.
Checkpoints are atomic file by file, with ``train_state.pt`` written last (see
:mod:`rowcol.checkpoint`), so a resume starts from the last whole checkpoint and redoes the rest;
SIGTERM / Ctrl-C finish the current step, write a resumable checkpoint and stop. A non-finite
loss or gradient skips the step on every rank, and no checkpoint takes weights that have not
given a finite loss; ``max_nonfinite`` in a row raise :class:`~rowcol.errors.NonFiniteLossError`
with the last good checkpoint intact and the commands that resume or restart the run.
"""
from __future__ import annotations

import dataclasses
import json
import math
import shlex
import signal
import sys
import time
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from timm.data import Mixup
from timm.data.random_erasing import RandomErasing
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from tqdm import tqdm

import rowcol
from rowcol import checkpoint as ckpt
from rowcol.config import RESUMABLE, TrainConfig, config_from_dict, resolve_config
from rowcol.data import save_split
from rowcol.errors import CheckpointError, ConfigError, NonFiniteLossError, RunExistsError
from rowcol.halve import halve
from rowcol.models import create_model, model_defaults, pe_spec
from rowcol.pipeline import NAMED, build_data, data_fingerprint, seed_step_rngs
from rowcol.runtime import Dist, all_reduce_sum, autocast, barrier, init_distributed

__all__ = ['train', 'run_train', 'train_one_epoch', 'evaluate', 'TrainResult', 'Stop', 'load_run_config',
           'resume_config', 'plot_curves', 'read_metrics', 'train_command', 'check_run_dir']

RUN_FILES = (ckpt.MARKER, ckpt.CONFIG, ckpt.WEIGHTS, ckpt.BEST, ckpt.EMA, ckpt.STATE, 'split.json', 'metrics.jsonl',
             'curves.png', 'skipped_images.json')


# ---------------------------------------------------------------------------- run directory

@dataclass
class TrainResult:
    run_dir: Path
    status: str                       # finished | stopped (max_steps) | interrupted
    step_losses: list[float] = field(default_factory=list)
    metrics: list[dict] = field(default_factory=list)


class Stop:
    """Set by SIGTERM/SIGINT; the loop checks it after every step."""
    signum: Optional[int] = None


@contextmanager
def _stop_on_signals():
    Stop.signum = None
    handler = lambda signum, frame: setattr(Stop, 'signum', signum)  # noqa: E731
    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _holds_files(output: Path) -> bool:
    """Whether ``output`` holds anything besides a run lock and the temp files of killed writes."""
    if not output.exists():
        return False
    if not output.is_dir():
        raise RunExistsError(f'{output} is a file, not a folder; pass another --output')
    leftovers = tuple(f'.{name}.' for name in RUN_FILES)
    return any(p.name != ckpt.LOCK and not (p.name.endswith('.tmp') and p.name.startswith(leftovers))
               for p in output.iterdir())


def check_run_dir(output: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to start over an existing run or into a folder that is not a run, or to resume a
    directory without a checkpoint (reads only). Paths in suggested commands are shell-quoted."""
    q = shlex.quote(str(output))
    if resume:
        if (output / ckpt.STATE).is_file():
            return
        if ckpt.is_run_dir(output):
            raise CheckpointError(f'{output}: nothing to resume: the run stopped before its first checkpoint '
                                  f'(no {ckpt.STATE}); start it again with the command that made it and --overwrite')
        raise CheckpointError(f'{output}: nothing to resume (no {ckpt.STATE})')
    if not _holds_files(output):
        return
    if not ckpt.is_run_dir(output):
        raise RunExistsError(f'{output} is a folder with other files in it, not a rowcol run directory, so neither '
                             'a new run nor --overwrite may write there; pass a new or empty --output')
    if overwrite:
        return
    if (output / ckpt.STATE).is_file():
        raise RunExistsError(f'{output} already holds a run; pass --resume {q} to continue it '
                             f'or --overwrite to replace it')
    raise RunExistsError(f'{output} holds a run that stopped before its first checkpoint (nothing to resume); '
                         'pass --overwrite to start it again')


def clear_run_dir(output: Path) -> None:
    """Remove rowcol's files from the run directory ``output`` (for --overwrite); other files there are kept."""
    output.mkdir(parents=True, exist_ok=True)
    for name in RUN_FILES:
        (output / name).unlink(missing_ok=True)
    for events in output.glob('events.out.tfevents.*'):  # --log tensorboard's
        events.unlink()


class _TensorBoard:
    """``--log tensorboard``: each epoch's scalars (those of metrics.jsonl) as TensorBoard events in the run."""

    def __init__(self, output: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(log_dir=str(output))

    def log(self, row: dict) -> None:
        for key, value in row.items():
            if key != 'epoch' and isinstance(value, (int, float)):
                self.writer.add_scalar(key, value, global_step=row['epoch'])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def _check_log(cfg: TrainConfig) -> None:
    if cfg.log == 'tensorboard':
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise ConfigError('--log tensorboard needs the tensorboard package: pip install tensorboard') from None


def _lock_run(output: Path, resume: bool, overwrite: bool) -> ckpt.RunLock:
    """Hold ``output``'s lock, then check it again (no other process writes it now) and remove
    the temporary files a killed run left."""
    lock = ckpt.RunLock(output)
    stale = lock.acquire()
    try:
        if stale:
            print(f'{output}: took over the lock left by {stale}, which is no longer running', file=sys.stderr)
        check_run_dir(output, resume, overwrite)
        removed = ckpt.remove_leftovers(output, RUN_FILES)
        if removed:
            print(f'{output}: removed {len(removed)} temporary file(s) of an interrupted write: {", ".join(removed)}',
                  file=sys.stderr)
    except BaseException:
        lock.release()
        raise
    return lock


def load_run_config(run_dir: str | Path) -> TrainConfig:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f'{run_dir}: run directory not found')
    return config_from_dict(ckpt.read_json(run_dir / ckpt.CONFIG), str(run_dir / ckpt.CONFIG))


def resume_config(run_dir: str | Path, overrides: dict) -> TrainConfig:
    """The saved config of ``run_dir`` with the few changes a resumed run may take."""
    cfg = load_run_config(run_dir)
    overrides = {**overrides, **{k: _absolute(overrides[k]) for k in ('data', 'val_data') if k in overrides}}
    for key, value in overrides.items():
        if key in RESUMABLE:
            setattr(cfg, key, value)
        elif getattr(cfg, key) != value:
            raise ConfigError(f'--{key.replace("_", "-")} cannot change on --resume (run has {getattr(cfg, key)!r}); '
                              f'only {", ".join(sorted(RESUMABLE))} can')
    return cfg.validate()


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


# ---------------------------------------------------------------------------- steps

def compute_loss(criterion: nn.Module, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return criterion(output.float(), target)


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


def train_one_epoch(model, loader, optimizer, scheduler, criterion, cfg: TrainConfig, state: dict,
                    device: torch.device, d: Dist, ema=None, mixup=None, erasing=None, scaler=None,
                    save=lambda state: None, progress: bool = True, teacher=None) -> dict:
    """One epoch from ``state['batch']``; ``state`` (epoch, batch, step, sums) is updated in place.

    A step whose loss or gradient is not finite is skipped. Checkpoints hold only weights that
    gave a finite loss: one due every ``cfg.save_every_steps`` is written at the next step, once
    its forward pass is finite, and dropped otherwise. Stops early, after saving, when a signal
    arrived on any process or at ``cfg.max_steps``.
    """
    model.train()
    epoch = state['epoch']
    bar = tqdm(total=len(loader), initial=state['batch'], desc=f'epoch {epoch + 1}/{cfg.epochs}',
               disable=not (progress and d.main), unit='batch', dynamic_ncols=True)
    t0 = time.perf_counter()
    due = False  # a checkpoint of the current weights, waiting for their loss on the next batch
    for x, y in loader.batches(epoch, state['batch']):
        seed_step_rngs(cfg.seed, epoch, state['batch'], d.rank)  # dropout, drop-path, mixup, erasing
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
        loss_value = loss.item()
        # one collective per step: non-finite losses, stop requests and the loss sum of all ranks
        bad, stop, loss_sum, n = all_reduce_sum(
            [float(not torch.isfinite(loss)), float(Stop.signum is not None), loss_value * len(x), float(len(x))],
            d, device)
        if due and bad == 0:  # state still describes the weights before this step
            state['seconds'] += time.perf_counter() - t0
            t0 = time.perf_counter()
            save(state)
        due = False
        if bad == 0 and _update(model, loss, optimizer, scaler, cfg):
            if ema is not None:
                ema.update(model, step=state['step'] + 1)  # updates so far, this one included: only the first copies
            state['nonfinite'] = 0
            state['loss_sum'] += loss_sum
            state['count'] += n
        else:  # skipped on every rank alike
            state['nonfinite'] += 1
            if state['nonfinite'] >= cfg.max_nonfinite:
                bar.close()
                raise NonFiniteLossError(
                    f'{state["nonfinite"]} non-finite losses in a row (a loss or its gradient was inf or NaN; '
                    f'epoch {epoch + 1}, batch {state["batch"]})')
        state['step'] += 1
        state['batch'] += 1
        scheduler.step_update(num_updates=state['step'])
        state['losses'].append(loss_value)
        elapsed = state['seconds'] + time.perf_counter() - t0
        bar.update(1)
        bar.set_postfix(loss=f'{loss_value:.4f}', lr=f'{optimizer.param_groups[0]["lr"]:.2e}',
                        img_s=f'{state["count"] / max(elapsed, 1e-9):.0f}')
        reason = 'signal' if stop > 0 else 'max_steps' if _at_max_steps(cfg, state) else None
        if reason:
            state['seconds'] += time.perf_counter() - t0
            t0 = time.perf_counter()
            if state['nonfinite'] == 0:  # never the weights that just gave a non-finite loss
                save(state)
            state['stopped'] = reason
            break
        due = bool(cfg.save_every_steps) and state['step'] % cfg.save_every_steps == 0 and state['nonfinite'] == 0
    state['seconds'] += time.perf_counter() - t0
    bar.close()
    return state


def _at_max_steps(cfg: TrainConfig, state: dict) -> bool:
    return bool(cfg.max_steps) and state['step'] >= cfg.max_steps  # None or 0: no limit


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, amp: str = 'none', d: Dist = Dist(),
             num_classes: Optional[int] = None, channels_last: bool = False, progress: bool = False) -> dict:
    """Loss, top-1, top-5 (percent) over the whole loader; a confusion matrix if ``num_classes``."""
    model.eval()
    sums = [0., 0., 0., 0.]  # loss, top1, top5, n
    confusion = torch.zeros(num_classes or 1, num_classes or 1, dtype=torch.long)
    for x, y in tqdm(loader.batches(), total=len(loader), desc='eval', disable=not (progress and d.main)):
        x, y = x.to(device), y.to(device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, amp):
            out = model(x).float()
        k = min(5, out.shape[1])
        topk = out.topk(k, dim=1).indices  # (B, k)
        hit = topk == y[:, None]
        sums[0] += F.cross_entropy(out, y, reduction='sum').item()
        sums[1] += hit[:, 0].sum().item()
        sums[2] += hit.any(1).sum().item()
        sums[3] += len(y)
        if num_classes:
            confusion += torch.bincount(y.cpu() * num_classes + topk[:, 0].cpu(),
                                        minlength=num_classes ** 2).view(num_classes, num_classes)
    sums = all_reduce_sum(sums, d, device)
    if d.world > 1 and num_classes:
        confusion = confusion.to(device)
        dist.all_reduce(confusion)
        confusion = confusion.cpu()
    n = max(sums[3], 1)
    result = dict(loss=sums[0] / n, top1=100 * sums[1] / n, top5=100 * sums[2] / n, num_images=int(sums[3]))
    if num_classes:
        result['confusion'] = confusion
    return result


# ---------------------------------------------------------------------------- state

def plot_curves(path: Path, runs: dict[str, list[dict]]) -> None:
    """Loss (train solid, val dashed) and validation top-1 per epoch, one colour per run."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(9, 3.5))
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    for label, rows in runs.items():
        ep = [r['epoch'] for r in rows]
        prefix = f'{label} ' if label else ''
        ax1.plot(ep, [r['train_loss'] for r in rows], label=f'{prefix}train')
        if rows and 'val_loss' in rows[0]:
            ax1.plot(ep, [r['val_loss'] for r in rows], '--', label=f'{prefix}val')
            ax2.plot(ep, [r['val_top1'] for r in rows], label=label or 'val top-1')
    ax1.set(xlabel='epoch', ylabel='loss')
    ax2.set(xlabel='epoch', ylabel='val top-1 (%)')
    for a in (ax1, ax2):
        a.grid(alpha=.3)
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=8)
    fig.tight_layout()
    ckpt.atomic_write(path, lambda tmp: fig.savefig(tmp, format='png', dpi=100))


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / 'metrics.jsonl'
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


# ---------------------------------------------------------------------------- train

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


def distill_loss(loss: torch.Tensor, student: torch.Tensor, teacher: torch.Tensor, alpha: float,
                 tau: float) -> torch.Tensor:
    """``(1 - alpha) loss + alpha tau² KL(teacher/tau ‖ student/tau)`` (soft targets, as DeiT's soft distillation)."""
    kl = F.kl_div(F.log_softmax(student.float() / tau, dim=-1), F.log_softmax(teacher.float() / tau, dim=-1),
                  reduction='batchmean', log_target=True)
    return (1 - alpha) * loss + alpha * tau * tau * kl


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


def _absolute(path: Optional[str]) -> Optional[str]:
    """Data paths are stored absolute, so eval can tell a run's own data from any cwd."""
    return path if path is None or path in NAMED else str(Path(path).expanduser().resolve())


def train(cfg: TrainConfig, output: str | Path, resume: bool = False, overwrite: bool = False,
          progress: bool = True) -> TrainResult:
    """Train ``cfg`` into the run directory ``output`` (or continue it with ``resume``).

    Everything that can fail on user input (device, data, model arguments, optimizer,
    schedule) is checked before the run directory is touched; then the process that writes
    (rank 0) holds the directory's lock until it returns.
    """
    output = Path(output)
    cfg.data, cfg.val_data = _absolute(cfg.data), _absolute(cfg.val_data)
    cfg.init_from, cfg.teacher = _absolute(cfg.init_from), _absolute(cfg.teacher)
    restart_cfg = dataclasses.replace(cfg)  # as given, for the restart command of a diverged run
    with ExitStack() as held:  # the run's lock, taken inside once the inputs are checked
        try:
            return _train(cfg, output, resume, overwrite, progress, held)
        except NonFiniteLossError as e:
            raise NonFiniteLossError(f'{e}; {_way_forward(restart_cfg, output)}') from None


def _way_forward(cfg: TrainConfig, output: Path) -> str:
    """The commands that go on after a divergence: resume the last checkpoint, or start again."""
    restart = train_command(cfg, output, lr=float(f'{cfg.scaled_lr() / 2:.3g}'))
    if not (output / ckpt.STATE).is_file():
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


def _finite(model: nn.Module) -> bool:
    return bool(torch.stack([p.detach().isfinite().all() for p in model.parameters()]).all())


def _write_metrics(output: Path, rows: list[dict]) -> None:
    ckpt.atomic_write(output / 'metrics.jsonl',
                      lambda tmp: Path(tmp).write_text(''.join(json.dumps(r) + '\n' for r in rows)))


def _train(cfg: TrainConfig, output: Path, resume: bool, overwrite: bool, progress: bool,
           held: ExitStack) -> TrainResult:
    check_run_dir(output, resume, overwrite)  # every rank raises alike; again under the lock
    _check_log(cfg)
    d, device = init_distributed(cfg.device)
    if cfg.amp == 'fp16' and device.type != 'cuda':
        raise ConfigError('--amp fp16 needs a CUDA device; use --amp bf16 on CPU')
    if (cfg.mixup > 0 or cfg.cutmix > 0) and (cfg.batch_size // d.world) % 2:
        raise ConfigError(f'Mixup/CutMix need an even batch per process; got {cfg.batch_size // d.world}')

    defaults = model_defaults(cfg.model)  # input size and normalisation of the model
    img_size = cfg.img_size or defaults['input_size'][-1]
    data = build_data(cfg, img_size, defaults['mean'], defaults['std'], d, progress=progress and d.main)
    num_classes = len(data.classes)
    torch.manual_seed(cfg.seed)  # the initial weights
    if cfg.init_from and not resume:  # a resumed run takes its weights from the state instead
        model = _init_from(cfg, _build_model(cfg, num_classes, halved=False), data.classes)
    else:
        model = _build_model(cfg, num_classes)
    teacher = _load_teacher(cfg, data.classes, device) if cfg.teacher else None
    if cfg.channels_last is None:
        cfg.channels_last = not hasattr(model, 'patch_embed')  # CNNs run faster channels_last
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    if cfg.grad_checkpointing:
        from timm.layers import use_reentrant_ckpt
        if use_reentrant_ckpt():  # with shared weights and DDP, reentrant checkpointing corrupts gradients
            raise ConfigError('--grad-checkpointing: TIMM_REENTRANT_CKPT is set; rowcol needs non-reentrant '
                              'checkpointing, unset it')
        model.set_grad_checkpointing(True)
    optimizer, scheduler = _build_optim(cfg, model, len(data.train))
    ema = ModelEmaV3(model, decay=cfg.ema_decay, exclude_buffers=True) if cfg.ema_decay else None
    scaler = torch.amp.GradScaler('cuda') if cfg.amp == 'fp16' else None
    mixup = None
    if cfg.mixup > 0 or cfg.cutmix > 0:
        mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.label_smoothing,
                      num_classes=num_classes)
        criterion = SoftTargetCrossEntropy()  # the smoothing is in Mixup's soft targets
    else:
        criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    erasing = None  # streamed data erases inside its transform
    if cfg.reprob > 0 and data.in_memory:
        erasing = RandomErasing(cfg.reprob, mode='pixel', device=str(device))

    if d.main:  # rank 0 writes, rank 0 locks
        held.enter_context(_lock_run(output, resume, overwrite))

    state = dict(epoch=0, batch=0, step=0, best_top1=-1., nonfinite=0, loss_sum=0., count=0., seconds=0.)
    rows: list[dict] = []
    if resume:
        saved = ckpt.load_state(output / ckpt.STATE)
        try:
            model.load_state_dict(saved['model'])
            optimizer.load_state_dict(saved['optimizer'])
            if ema is not None and saved.get('ema') is not None:
                ema.module.load_state_dict(saved['ema'])
            if scaler is not None and saved.get('scaler'):
                scaler.load_state_dict(saved['scaler'])
        except (RuntimeError, ValueError, KeyError) as e:
            raise CheckpointError(f'{output / ckpt.STATE}: does not fit this run: {str(e).splitlines()[0]}') from None
        state.update(saved['loop'])
        # the schedule is rebuilt from the (possibly extended) config, then moved to the step reached
        scheduler.step_update(num_updates=state['step'])
        # rows of epochs the checkpoint does not hold were written by a checkpoint that never completed
        rows = read_metrics(output)
        if any(r['epoch'] > state['epoch'] for r in rows):
            rows = [r for r in rows if r['epoch'] <= state['epoch']]
            if d.main:
                _write_metrics(output, rows)
    state['losses'] = []

    train_model = model
    if d.world > 1:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[d.local_rank] if device.type == 'cuda' else None)
    if cfg.compile:
        train_model = torch.compile(train_model)

    meta = {'model': cfg.model, 'num_classes': str(num_classes)}

    def save(st: dict, epoch_rows: Optional[list[dict]] = None, best: bool = False) -> None:
        """One checkpoint: the weights, the EMA weights and, at an epoch's end, the best weights,
        metrics.jsonl and curves.png; then train_state.pt, last, so that a resume starts from the
        last checkpoint that was written whole and redoes what came after it."""
        if not _finite(model):
            raise NonFiniteLossError(f'the weights became inf or NaN by step {st["step"]}')
        if not d.main:
            return
        loop = {k: st[k] for k in ('epoch', 'batch', 'step', 'best_top1', 'nonfinite', 'loss_sum', 'count', 'seconds')}
        ckpt.save_weights(model, output / ckpt.WEIGHTS, meta)
        if ema is not None:
            ckpt.save_weights(ema.module, output / ckpt.EMA, meta)
        if best:
            ckpt.save_weights(model, output / ckpt.BEST, meta)
        if epoch_rows is not None:
            _write_metrics(output, epoch_rows)
            plot_curves(output / 'curves.png', {'': epoch_rows})
        ckpt.save_state({'model': model.state_dict(), 'optimizer': optimizer.state_dict(),
                         'ema': ema.module.state_dict() if ema else None,
                         'scaler': scaler.state_dict() if scaler else None, 'loop': loop}, output / ckpt.STATE)

    if d.main:
        if overwrite and not resume:
            clear_run_dir(output)
        ckpt.mark_run(output, rowcol.__version__)  # first: from now on --overwrite may replace this folder
    board = _TensorBoard(output) if d.main and cfg.log == 'tensorboard' else None
    if d.main and not resume:
        ckpt.write_json(output / ckpt.CONFIG, {**asdict(cfg), 'num_classes': num_classes, 'classes': data.classes,
                                               'world_size': d.world, 'device_used': device.type,
                                               'rowcol_version': rowcol.__version__})
        if data.split is not None:
            save_split(output / 'split.json', data.split['train'], data.split['val'], seed=data.split['seed'],
                       val_frac=data.split['val_frac'], num_samples=data.split['num_samples'],
                       files=data_fingerprint(cfg.data, data.split['num_samples']))
        if data.skipped:
            ckpt.write_json(output / 'skipped_images.json', [list(s) for s in data.skipped])
            print(f'skipped {len(data.skipped)} bad image(s); listed in {output / "skipped_images.json"}')

    result = TrainResult(output, 'finished')
    with _stop_on_signals():
        while state['epoch'] < cfg.epochs and not _at_max_steps(cfg, state):
            state = train_one_epoch(train_model, data.train, optimizer, scheduler, criterion, cfg, state, device,
                                    d, ema, mixup, erasing, scaler, save, progress, teacher)
            result.step_losses += state['losses']
            state['losses'] = []
            stopped = state.pop('stopped', None)
            if stopped == 'signal':
                result.status = 'interrupted'
            if stopped and state['batch'] < len(data.train):
                break  # stopped inside the epoch, checkpoint written
            row = dict(epoch=state['epoch'] + 1, step=state['step'],
                       train_loss=state['loss_sum'] / max(state['count'], 1),
                       lr=optimizer.param_groups[0]['lr'], img_per_s=state['count'] / max(state['seconds'], 1e-9),
                       seconds=state['seconds'])
            if data.val is not None:
                t_eval = time.perf_counter()
                val = evaluate(model, data.val, device, cfg.amp, d, channels_last=cfg.channels_last)
                row.update(val_loss=val['loss'], val_top1=val['top1'], val_top5=val['top5'])
                if ema is not None:
                    row['ema_val_top1'] = evaluate(ema.module, data.val, device, cfg.amp, d,
                                                   channels_last=cfg.channels_last)['top1']
                row['eval_seconds'] = time.perf_counter() - t_eval
            # weights that just gave a non-finite training loss count as good only if validation confirms them
            unconfirmed = state['nonfinite'] > 0 and not math.isfinite(row.get('val_loss', math.nan))
            state.update(epoch=state['epoch'] + 1, batch=0, loss_sum=0., count=0., seconds=0.)
            is_best = data.val is not None and row['val_top1'] > state['best_top1']
            if is_best:
                state['best_top1'] = row['val_top1']
            rows.append(row)
            result.metrics.append(row)
            if unconfirmed:
                print(f'epoch {row["epoch"]}: not checkpointed, its last training loss was not finite', file=sys.stderr)
            else:
                save(state, rows, is_best)
                if board is not None:
                    board.log(row)
            if d.main and progress:
                print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}))
            if stopped:
                break
        if result.status != 'interrupted' and state['epoch'] < cfg.epochs:
            result.status = 'stopped'
    if board is not None:
        board.close()
    barrier(d)
    return result
