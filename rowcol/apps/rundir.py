"""A training run's directory: which files it holds, who may write them, and in what order.

:class:`RunDir` owns every file of a run (listed in :mod:`rowcol.apps.checkpoint`): it refuses to
start over another run or into a folder that is not a run, holds the run's lock, marks the
folder, and writes the config, the split, metrics.jsonl, curves.png, the weights and the
training state, each atomically. :meth:`RunDir.save_checkpoint` writes ``train_state.pt`` last,
so a resume starts from the last checkpoint whose files are all in place. Only the process that
writes a run (rank 0) calls the writing methods.

:func:`load_run_config` and :func:`resume_config` read a run's config back.
"""
from __future__ import annotations

import dataclasses
import shlex
import sys
from pathlib import Path

import torch.nn as nn

from rowcol import __version__
from rowcol.apps import checkpoint as ckpt
from rowcol.apps.config import RESUMABLE, TrainConfig, absolute_path, config_from_dict
from rowcol.apps.data import save_split
from rowcol.errors import CheckpointError, ConfigError, RunExistsError
from rowcol.apps.plots import METRICS, plot_curves, read_metrics, write_metrics

__all__ = ['RunDir', 'RUN_FILES', 'check_run_dir', 'load_run_config', 'resume_config', 'TensorBoard']

SPLIT = 'split.json'
CURVES = 'curves.png'
SKIPPED = 'skipped_images.json'
RUN_FILES = (ckpt.MARKER, ckpt.CONFIG, ckpt.WEIGHTS, ckpt.BEST, ckpt.EMA, ckpt.STATE, SPLIT, METRICS, CURVES, SKIPPED)


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


def load_run_config(run_dir: str | Path) -> TrainConfig:
    """The config a run was trained with (its config.json, checked as strictly as the command line)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f'{run_dir}: run directory not found')
    return config_from_dict(ckpt.read_json(run_dir / ckpt.CONFIG), str(run_dir / ckpt.CONFIG))


def resume_config(run_dir: str | Path, overrides: dict) -> TrainConfig:
    """The saved config of ``run_dir`` with the few changes a resumed run may take (a new config)."""
    cfg = load_run_config(run_dir)
    overrides = {**overrides, **{k: absolute_path(overrides[k]) for k in ('data', 'val_data') if k in overrides}}
    for key, value in overrides.items():
        if key not in RESUMABLE and getattr(cfg, key) != value:
            raise ConfigError(f'--{key.replace("_", "-")} cannot change on --resume (run has {getattr(cfg, key)!r}); '
                              f'only {", ".join(sorted(RESUMABLE))} can')
    return dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if k in RESUMABLE}).validate()


class RunDir:
    """The files of the run directory ``path``."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __str__(self) -> str:
        return str(self.path)

    # ------------------------------------------------------------------ before writing

    def check(self, resume: bool, overwrite: bool) -> None:
        """:func:`check_run_dir`: may a run start (or, with ``resume``, continue) here? Reads only."""
        check_run_dir(self.path, resume, overwrite)

    def has_checkpoint(self) -> bool:
        return (self.path / ckpt.STATE).is_file()

    def lock(self, resume: bool, overwrite: bool) -> ckpt.RunLock:
        """Hold the directory's lock, then check it again (no other process writes it now) and
        remove the temporary files a killed run left. Release the returned lock when done."""
        lock = ckpt.RunLock(self.path)
        stale = lock.acquire()
        try:
            if stale:
                print(f'{self.path}: took over the lock left by {stale}, which is no longer running', file=sys.stderr)
            self.check(resume, overwrite)
            removed = ckpt.remove_leftovers(self.path, RUN_FILES)
            if removed:
                print(f'{self.path}: removed {len(removed)} temporary file(s) of an interrupted write: '
                      f'{", ".join(removed)}', file=sys.stderr)
        except BaseException:
            lock.release()
            raise
        return lock

    def clear(self) -> None:
        """Remove rowcol's files (for --overwrite); other files in the folder are kept."""
        self.path.mkdir(parents=True, exist_ok=True)
        for name in RUN_FILES:
            (self.path / name).unlink(missing_ok=True)
        for events in self.path.glob('events.out.tfevents.*'):  # --log tensorboard's
            events.unlink()

    def mark(self) -> None:
        """Mark the folder as a rowcol run: the first file a run writes; from then on --overwrite may replace it."""
        ckpt.mark_run(self.path, __version__)

    # ------------------------------------------------------------------ once, at the start

    def write_config(self, cfg: TrainConfig, classes: list[str], world_size: int, device_used: str) -> None:
        ckpt.write_json(self.path / ckpt.CONFIG, {**dataclasses.asdict(cfg), 'num_classes': len(classes),
                                                  'classes': classes, 'world_size': world_size,
                                                  'device_used': device_used, 'rowcol_version': __version__})

    def write_split(self, split: dict, files: str | None) -> None:
        """The validation split made for this run (``split``: seed, val_frac, num_samples, train, val)."""
        save_split(self.path / SPLIT, split['train'], split['val'], seed=split['seed'], val_frac=split['val_frac'],
                   num_samples=split['num_samples'], files=files)

    def write_skipped(self, skipped: list) -> Path:
        ckpt.write_json(self.path / SKIPPED, [list(s) for s in skipped])
        return self.path / SKIPPED

    # ------------------------------------------------------------------ checkpoints

    def read_metrics(self) -> list[dict]:
        return read_metrics(self.path)

    def write_metrics(self, rows: list[dict]) -> None:
        write_metrics(self.path, rows)

    def load_state(self) -> dict:
        return ckpt.load_state(self.path / ckpt.STATE)

    def save_checkpoint(self, model: nn.Module, state: dict, meta: dict[str, str], ema: nn.Module | None = None,
                        best: bool = False, rows: list[dict] | None = None) -> None:
        """One checkpoint: the weights, the EMA weights, the best weights (``best``), at an epoch's
        end (``rows``) metrics.jsonl and curves.png; then ``state`` as train_state.pt, last, so
        that a resume starts from the last checkpoint that was written whole."""
        ckpt.save_weights(model, self.path / ckpt.WEIGHTS, meta)
        if ema is not None:
            ckpt.save_weights(ema, self.path / ckpt.EMA, meta)
        if best:
            ckpt.save_weights(model, self.path / ckpt.BEST, meta)
        if rows is not None:
            write_metrics(self.path, rows)
            plot_curves(self.path / CURVES, {'': rows})
        ckpt.save_state(state, self.path / ckpt.STATE)


class TensorBoard:
    """``--log tensorboard``: each epoch's scalars (those of metrics.jsonl) as TensorBoard events in the run."""

    def __init__(self, run: RunDir) -> None:
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(log_dir=str(run.path))

    def log(self, row: dict) -> None:
        for key, value in row.items():
            if key != 'epoch' and isinstance(value, (int, float)):
                self.writer.add_scalar(key, value, global_step=row['epoch'])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
