"""Run directories and checkpoints: atomic writes, safetensors weights, weights_only state.

A run directory holds::

    rowcol_run.json        marks the folder as a rowcol run: only such a folder is replaced by --overwrite
    .rowcol.lock           held (flock) by the process writing the run; holds its pid
    config.json            the resolved TrainConfig (plus classes)
    model.safetensors      last weights; every shared W stored once, loads with strict=True
    model_best.safetensors weights of the best validation top-1 so far
    model_ema.safetensors  EMA weights, when EMA is on
    train_state.pt         model, optimizer, EMA, loop position (weights_only=True); the schedule is
                           rebuilt from the config, random draws are functions of the step
    split.json             the validation split, so ``rowcol eval`` can reuse it
    metrics.jsonl          one line per epoch
    curves.png             loss / accuracy curves

Every file is written to a temporary name in the same directory and renamed into place
(:func:`rowcol.apps.fileio.atomic_write`, re-exported here),
so a kill at any instant leaves the previous checkpoint loadable; the training loop writes
``train_state.pt`` last, so a checkpoint counts only once all its files are in place. Each
weights file carries a sha256 of its tensors in its header, checked on every load.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model, save_model

from rowcol.errors import CheckpointError, ConfigError, RunLockedError
from rowcol.apps.fileio import atomic_write, write_json  # re-exported: the writes every run file goes through

__all__ = ['atomic_write', 'write_json', 'read_json', 'save_weights', 'load_weights', 'weights_digest',
           'save_state', 'load_state', 'load_run', 'build_run_model', 'RunLock', 'mark_run', 'is_run_dir',
           'remove_leftovers', 'WEIGHTS', 'BEST', 'EMA', 'STATE', 'CONFIG', 'MARKER', 'LOCK']

MARKER = 'rowcol_run.json'
LOCK = '.rowcol.lock'
CONFIG = 'config.json'
WEIGHTS = 'model.safetensors'
BEST = 'model_best.safetensors'
EMA = 'model_ema.safetensors'
STATE = 'train_state.pt'


def read_json(path: str | Path) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f'{path}: file not found') from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f'{path}: not valid JSON ({e})') from None


DIGEST_KEY = 'rowcol_sha256'


def weights_digest(model: nn.Module) -> str:
    """sha256 of ``model``'s state dict (names, dtypes, shapes, bytes, in name order)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()  # channels_last or not, the same bytes
        h.update(f'{name} {t.dtype} {tuple(t.shape)}\n'.encode())
        h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


def save_weights(model: nn.Module, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors file of ``model``'s state; ``save_model`` keeps one copy of any shared tensor.

    The header's metadata carries :func:`weights_digest`, so the checksum is renamed into place
    with the tensors it describes (a separate checksum file could not be).
    """
    metadata = {**(metadata or {}), DIGEST_KEY: weights_digest(model)}
    atomic_write(path, lambda tmp: save_model(model, tmp, metadata=metadata))


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Strict load, checked against the file's checksum; a file that does not fit the model or
    does not match its checksum is a ``CheckpointError``. Files without a checksum (written by
    rowcol before checksums, or by other tools) load unchecked."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f'{path}: weights file not found')
    try:
        with safe_open(path, 'pt') as f:
            expected = (f.metadata() or {}).get(DIGEST_KEY)
        missing, unexpected = load_model(model, path, strict=False)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f'{path}: not a readable safetensors file ({e})') from None
    except RuntimeError as e:  # shape mismatch
        raise CheckpointError(f'{path}: does not fit the model: {_first_line(e)}') from None
    if missing or unexpected:
        raise CheckpointError(f'{path}: does not fit the model: missing keys {sorted(missing)[:5]}, '
                              f'unexpected keys {sorted(unexpected)[:5]}')
    if expected is not None and weights_digest(model) != expected:
        raise CheckpointError(f'{path}: the weights do not match the checksum stored with them; the file is '
                              'corrupt (changed bytes), use another copy of it')
    return model


def _first_line(e: Exception) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return ' '.join(lines[:3])


def save_state(state: dict, path: str | Path) -> None:
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_state(path: str | Path) -> dict:
    """Training state; tensors and plain Python only (``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f'{path}: training state not found (is this a run directory?)')
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # pickle, zip and weights_only errors all mean "unusable file"
        raise CheckpointError(f'{path}: cannot load training state ({_first_line(e)})') from None


def load_run(run_dir: str | Path, which: str = 'last') -> tuple[nn.Module, dict]:
    """Build the model of a run directory and load its weights (``which``: last, best or ema).

    Returns the model in eval mode and the run's config dict.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f'{run_dir}: not a run directory')
    files = {'last': WEIGHTS, 'best': BEST, 'ema': EMA}
    if which not in files:
        raise CheckpointError(f"unknown weights '{which}', expected one of {sorted(files)}")
    config = read_json(run_dir / CONFIG)
    model = build_run_model(config, run_dir / CONFIG)
    load_weights(model, run_dir / files[which])
    return model.eval(), config


def build_run_model(config: dict, cfg_path: str | Path = CONFIG) -> nn.Module:
    """The model a run's ``config.json`` describes (halved if it says so), with fresh weights."""
    from rowcol.apps.config import check_model_kwargs
    from rowcol.models import create_model
    if not isinstance(config, dict) or not isinstance(config.get('model'), str):
        raise CheckpointError(f"{cfg_path}: needs a string 'model' key")
    kwargs = config.get('model_kwargs') or {}
    try:
        check_model_kwargs(kwargs, f"{cfg_path}: 'model_kwargs'")
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    if config.get('num_classes') is not None:
        kwargs = {**kwargs, 'num_classes': int(config['num_classes'])}
    try:
        model = create_model(config['model'], img_size=config.get('img_size'), **kwargs)
        if config.get('halve'):
            from rowcol.halve import halve
            halve(model, attn=config.get('halve_attn', 'qo_kv'), use_scale=bool(config.get('halve_scale')))
    except (TypeError, ValueError, KeyError, AssertionError, RuntimeError) as e:
        raise CheckpointError(f"{cfg_path}: cannot build {config['model']} ({_first_line(e)})") from None
    return model


# ---------------------------------------------------------------------------- run directories

def mark_run(run_dir: str | Path, version: str) -> None:
    """Mark ``run_dir`` as a rowcol run directory (the first file a run writes)."""
    if not (Path(run_dir) / MARKER).is_file():
        write_json(Path(run_dir) / MARKER, {'rowcol_run': 1, 'rowcol_version': version})


def is_run_dir(run_dir: str | Path) -> bool:
    """Whether rowcol marked ``run_dir`` as a run; runs made before the marker are known by their
    ``config.json`` (with the ``model``, ``classes`` and ``rowcol_version`` keys rowcol writes)."""
    run_dir = Path(run_dir)
    if (run_dir / MARKER).is_file():
        return True
    try:
        config = json.loads((run_dir / CONFIG).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and {'model', 'classes', 'rowcol_version'} <= set(config)


def remove_leftovers(run_dir: str | Path, names: tuple[str, ...]) -> list[str]:
    """Delete the temporary files (``.<name>.*.tmp``) that a killed :func:`atomic_write` of one
    of ``names`` left in ``run_dir``; returns their names. Call only while holding the run's lock."""
    removed = []
    for path in sorted(Path(run_dir).glob('.*.tmp')):
        if any(path.name.startswith(f'.{name}.') for name in names):
            path.unlink(missing_ok=True)
            removed.append(path.name)
    return removed


class RunLock:
    """An exclusive ``flock`` on ``run_dir/.rowcol.lock`` while one process writes the run.

    The file holds the holder's pid and host. The kernel drops the lock when its process dies,
    however it dies; a pid left in the file by such a process makes the lock stale, and
    :meth:`acquire` takes it over and returns that pid's line so the caller can say so.
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK
        self.fd: int | None = None

    def acquire(self) -> str | None:
        """Take the lock, or raise :class:`RunLockedError` naming the holder; returns the stale
        holder's line (``pid N on HOST``) when one was taken over, else None."""
        import fcntl
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(fd) or 'a process that has not written its pid yet'
            os.close(fd)
            raise RunLockedError(f'{self.run_dir} is in use: another rowcol process ({holder}) is training into it; '
                                 'wait for it to end, or stop it first') from None
        except OSError:  # a file system without flock: run unlocked rather than not at all
            os.close(fd)
            return None
        stale = _lock_holder(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f'pid {os.getpid()} on {socket.gethostname()}\n'.encode(), 0)
        self.fd = fd
        return stale

    def release(self) -> None:
        """Empty the file (a later start finds no stale pid) and drop the lock."""
        if self.fd is None:
            return
        import fcntl
        os.ftruncate(self.fd, 0)
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> 'RunLock':
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _lock_holder(fd: int) -> str | None:
    text = os.pread(fd, 200, 0).decode(errors='replace').strip()
    return text or None
