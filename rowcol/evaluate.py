"""``rowcol eval``: score a run directory, or a timm model's weights file, on a folder of class folders.

Reuses the run's validation split (``split.json``) when ``--data`` is the run's own training
data (the same path, or a copy elsewhere with the same file names and sizes), so the numbers
match the ones logged in training; otherwise scores the evaluation part of
``--data`` (a bare folder of class folders: every image; a train/val layout: ``val/``; CIFAR:
the test set). Class names must match the checkpoint's, in order.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from rowcol import checkpoint as ckpt
from rowcol.config import config_from_dict
from rowcol.data import load_split
from rowcol.errors import CheckpointError, DataError
from rowcol.models import model_defaults
from rowcol.pipeline import NAMED, build_eval_data, data_fingerprint
from rowcol.runtime import resolve_device
from rowcol.train import evaluate

__all__ = ['evaluate_run', 'evaluate_file', 'load_weights_file', 'plot_confusion']


def _same_path(data: str, run_data: str) -> bool:
    if data in NAMED or run_data in NAMED:
        return data == run_data
    return Path(data).expanduser().resolve() == Path(run_data).expanduser().resolve()


def _same_files(data: str, record: dict) -> bool:
    """Does the image folder ``data`` hold the files the split was made from (moved elsewhere)?"""
    if data in NAMED or 'files' not in record:
        return False
    try:
        return record['files'] == data_fingerprint(data, record['num_samples'])
    except DataError:  # e.g. a folder with only val/: not the run's training data
        return False


def _run_split(split_file: Path, split: str, data: str, run_data: str) -> Optional[dict]:
    """The run's split record if ``split`` asks for it (``val``) or ``data`` is the run's own
    training data (``auto``); else None."""
    if split == 'all':
        return None
    if split == 'val' and not split_file.exists():
        raise DataError(f'{split_file}: the run has no saved validation split')
    if split == 'val' or (split_file.exists() and _same_path(data, run_data)):
        return load_split(split_file)
    if not split_file.exists():
        return None
    try:
        record = load_split(split_file)
    except DataError:  # unreadable, and --data is another folder: score all of it
        return None
    return record if _same_files(data, record) else None


def evaluate_run(run_dir: str | Path, data: str, weights: str = 'last', split: str = 'auto',
                 batch_size: Optional[int] = None, device: Optional[str] = None, progress: bool = False) -> dict:
    """top1, top5, loss, num_images, per_class (class -> top-1 %) and the confusion matrix.

    ``split``: ``val`` scores the run's saved validation split of ``data`` (its training data),
    ``all`` the evaluation part of ``data``, ``auto`` the first when ``data`` is the run's own.
    """
    run_dir = Path(run_dir)
    if split not in ('auto', 'val', 'all'):
        raise DataError(f"--split must be auto, val or all, got '{split}'")
    model, config = ckpt.load_run(run_dir, weights)
    cfg = config_from_dict(config, str(run_dir / ckpt.CONFIG))
    record = _run_split(run_dir / 'split.json', split, data, cfg.data)
    if batch_size:
        cfg.batch_size = batch_size
    defaults = model_defaults(cfg.model)
    img_size = cfg.img_size or defaults['input_size'][-1]
    loader, classes = build_eval_data(data, cfg, img_size, defaults['mean'], defaults['std'], record,
                                      progress=progress)
    if classes != config['classes']:
        extra = sorted(set(classes) - set(config['classes']))
        missing = sorted(set(config['classes']) - set(classes))
        raise DataError(f'{data}: classes do not match the checkpoint {run_dir} '
                        f'(not in checkpoint: {extra[:5]}, missing: {missing[:5]}'
                        f'{", same names in another order" if not extra and not missing else ""})')
    res = _score(model, loader, classes, device, cfg.amp, bool(cfg.channels_last), progress)
    res.update(split='val' if record else 'all', weights=weights, checkpoint=str(run_dir), data=str(data))
    return res


def _score(model, loader, classes: list[str], device: Optional[str], amp: str, channels_last: bool,
           progress: bool) -> dict:
    dev = resolve_device(device)
    model.to(dev)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    res = evaluate(model, loader, dev, amp, num_classes=len(classes), channels_last=channels_last, progress=progress)
    conf = res.pop('confusion')
    totals = conf.sum(1).clamp(min=1)
    res['per_class'] = {c: round(100 * conf[i, i].item() / totals[i].item(), 2) for i, c in enumerate(classes)}
    res['confusion'] = conf.tolist()
    return res


def load_weights_file(model: torch.nn.Module, path: str | Path, ema: bool = False) -> str:
    """Load a weights file into ``model`` (strict): ``.safetensors``, or a torch file read with
    ``weights_only=True`` that holds a state dict or timm train.py's checkpoint (``model_best.pth.tar``:
    ``state_dict``, ``state_dict_ema`` with ``ema``). DDP's ``module.`` prefixes are dropped. Returns
    what was loaded."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f'{path}: weights file not found')
    if path.suffix == '.safetensors':
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            state, what = load_file(str(path)), 'safetensors'
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f'{path}: not a readable safetensors file ({e})') from None
    else:
        try:
            obj = torch.load(path, map_location='cpu', weights_only=True)
        except Exception as e:  # pickle payloads, zip errors: an unusable file either way
            raise CheckpointError(f'{path}: cannot load with weights_only=True ({str(e).splitlines()[0]})') from None
        if isinstance(obj, dict) and ('state_dict' in obj or 'state_dict_ema' in obj):
            what = 'state_dict_ema' if ema else 'state_dict'
            if not isinstance(obj.get(what), dict):
                raise CheckpointError(f"{path}: no '{what}' in the checkpoint (keys: {sorted(obj)[:8]})")
            state = obj[what]
        elif isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
            if ema:
                raise CheckpointError(f'{path}: a plain state dict has no EMA weights')
            state, what = obj, 'state dict'
        else:
            raise CheckpointError(f'{path}: neither a state dict nor a checkpoint with state_dict')
    state = {k.removeprefix('module.'): v for k, v in state.items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f'{path}: does not fit the model: {str(e).splitlines()[0]} '
                              f'{" ".join(str(e).splitlines()[1:2])[:300]}') from None
    return what


def evaluate_file(model_name: str, weights: str | Path, data: str, ema: bool = False, batch_size: int = 256,
                  img_size: Optional[int] = None, device: Optional[str] = None, progress: bool = False) -> dict:
    """Score a weights file of timm model ``model_name`` (e.g. what timm's train.py writes) on the
    evaluation part of ``data``; the model gets one output per class of ``data``."""
    from rowcol.config import TrainConfig
    from rowcol.models import create_model
    defaults = model_defaults(model_name)
    size = img_size or defaults['input_size'][-1]
    cfg = TrainConfig(model=model_name, data=data, batch_size=batch_size, img_size=img_size)
    loader, classes = build_eval_data(data, cfg, size, defaults['mean'], defaults['std'], None, progress=progress)
    model = create_model(model_name, img_size=img_size, num_classes=len(classes))
    what = load_weights_file(model, weights, ema)
    res = _score(model.eval(), loader, classes, device, 'none', False, progress)
    res.update(split='all', weights=f'{weights} ({what})', checkpoint=model_name, data=str(data))
    return res


def plot_confusion(confusion: list[list[int]], classes: list[str], path: str | Path, title: str = '') -> None:
    """Row-normalised confusion matrix as a PNG (rows: true class, columns: predicted)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    c = torch.tensor(confusion, dtype=torch.float64)
    norm = c / c.sum(1, keepdim=True).clamp(min=1)
    n = len(classes)
    fig = Figure(figsize=(1 + 0.5 * n, 0.8 + 0.45 * n))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.imshow(norm.numpy(), cmap='Blues', vmin=0, vmax=1)
    if n <= 20:
        ax.set_xticks(range(n), classes, rotation=90)
        ax.set_yticks(range(n), classes)
        for i in range(n):
            for j in range(n):
                ax.text(j, i, int(c[i, j]), ha='center', va='center', fontsize=7,
                        color='white' if norm[i, j] > 0.5 else 'black')
    ax.set(xlabel='predicted', ylabel='true', title=title)
    fig.tight_layout()
    ckpt.atomic_write(path, lambda tmp: fig.savefig(tmp, format='png', dpi=100))
