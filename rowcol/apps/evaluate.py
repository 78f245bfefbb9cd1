"""Scoring: the evaluation loop (:func:`evaluate`, which training runs every epoch too), and ``rowcol
eval``: score a run directory, or a timm model's weights file, on a folder of class folders.

Reuses the run's validation split (``split.json``) when ``--data`` is the run's own training
data (the same path, or a copy elsewhere with the same file names and sizes), so the numbers
match the ones logged in training; otherwise scores the evaluation part of
``--data`` (a bare folder of class folders: every image; a train/val layout: ``val/``; CIFAR:
the test set). Class names must match the checkpoint's, in order.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from rowcol.apps import checkpoint as ckpt
from rowcol.apps.config import NAMED, DataConfig, config_from_dict
from rowcol.apps.data import load_split
from rowcol.errors import CheckpointError, DataError
from rowcol.models import model_defaults
from rowcol.apps.pipeline import build_eval_data, data_fingerprint
from rowcol.apps.runtime import Dist, all_reduce_sum, autocast, resolve_device

__all__ = ['evaluate', 'evaluate_run', 'evaluate_file', 'load_weights_file']


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, amp: str = 'none', d: Dist = Dist(),
             num_classes: int | None = None, channels_last: bool = False, progress: bool = False) -> dict:
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


def _run_split(split_file: Path, split: str, data: str, run_data: str) -> dict | None:
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
                 batch_size: int | None = None, device: str | None = None, progress: bool = False) -> dict:
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
    data_cfg = cfg.data_config()
    if batch_size:
        data_cfg = dataclasses.replace(data_cfg, batch_size=batch_size)
    defaults = model_defaults(cfg.model)
    img_size = cfg.img_size or defaults['input_size'][-1]
    loader, classes = build_eval_data(data, data_cfg, img_size, defaults['mean'], defaults['std'], record,
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


def _score(model, loader, classes: list[str], device: str | None, amp: str, channels_last: bool,
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
                  img_size: int | None = None, device: str | None = None, progress: bool = False) -> dict:
    """Score a weights file of timm model ``model_name`` (e.g. what timm's train.py writes) on the
    evaluation part of ``data``; the model gets one output per class of ``data``."""
    from rowcol.models import create_model
    defaults = model_defaults(model_name)
    size = img_size or defaults['input_size'][-1]
    loader, classes = build_eval_data(data, DataConfig(data=data, batch_size=batch_size), size, defaults['mean'],
                                      defaults['std'], None, progress=progress)
    model = create_model(model_name, img_size=img_size, num_classes=len(classes))
    what = load_weights_file(model, weights, ema)
    res = _score(model.eval(), loader, classes, device, 'none', False, progress)
    res.update(split='all', weights=f'{weights} ({what})', checkpoint=model_name, data=str(data))
    return res
