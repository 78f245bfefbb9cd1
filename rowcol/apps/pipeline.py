"""From a :class:`~rowcol.apps.config.DataConfig` to batches: dataset resolution, splits, augmentation, loaders.

Small datasets (digits, CIFAR, any folder of images <= 64 px) are decoded once into a uint8
tensor and batched by :class:`MemoryLoader`, which augments whole batches with tensor ops
(padded random crop, flip; timm RandAugment on request; the training loop adds random erasing
and Mixup/CutMix), so 2 cores spend their time on the model. The randomness of batch ``b`` of
epoch ``e`` is a function of ``(seed, e, b)`` alone: a run resumed mid-epoch sees the same
batches, and in a distributed run every rank draws the global batch's crops, flips and
RandAugment and keeps its own slice, so N processes see what one process would. Large datasets
stream through :class:`~rowcol.apps.data.FileDataset` with timm's ``create_transform`` in
DataLoader workers; they resume at the right batch but draw their augmentation anew.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from rowcol.apps.config import NAMED, DataConfig
from rowcol.apps.data import (MemoryData, Samples, decode_to_memory, files_fingerprint, find_image_folder,
                         load_digits_memory, load_image, load_torchvision_memory, scan_image_folder, stratified_split,
                         stratified_subset, FileDataset)
from rowcol.errors import BadImageError, ConfigError, DataError
from rowcol.apps.runtime import Dist, barrier

__all__ = ['DataConfig', 'DataBundle', 'MemoryLoader', 'StreamLoader', 'build_data', 'build_eval_data', 'eval_split',
           'step_seed', 'seed_step_rngs', 'NAMED']

MEMORY_MAX_PX = 64


def step_seed(seed: int, epoch: int, batch: int, rank: int = 0) -> int:
    """One 63-bit seed per (run seed, epoch, batch, rank)."""
    return (((seed * 1_000_003 + epoch) * 1_000_033 + batch) * 1_009 + rank) % (2 ** 63 - 1)


class BatchAugment:
    """Padded random crop and horizontal flip of a uint8 batch, vectorised; RandAugment opt-in."""

    def __init__(self, padding: int, hflip: float, auto_augment: str | None = None,
                 mean: tuple = (0.5, 0.5, 0.5)) -> None:
        self.padding, self.hflip = padding, hflip
        self.ra = None
        if auto_augment:
            self.ra = _rand_augment(auto_augment, mean)

    def params(self, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        p = self.padding
        oy = torch.randint(0, 2 * p + 1, (n,), generator=gen)
        ox = torch.randint(0, 2 * p + 1, (n,), generator=gen)
        flip = torch.rand(n, generator=gen) < self.hflip
        seeds = torch.randint(0, 2 ** 31 - 1, (n,), generator=gen)  # one per image, for RandAugment
        return oy, ox, flip, seeds

    def __call__(self, x: torch.Tensor, params) -> torch.Tensor:
        oy, ox, flip, seeds = params
        B, C, H, W = x.shape
        if self.padding:
            xp = F.pad(x, (self.padding,) * 4)  # (B, C, H+2p, W+2p), zero padding
            rows = (oy[:, None] + torch.arange(H))[:, None, :, None]  # (B, 1, H, 1)
            cols = (ox[:, None] + torch.arange(W))[:, None, None, :]  # (B, 1, 1, W)
            x = xp[torch.arange(B)[:, None, None, None], torch.arange(C)[None, :, None, None], rows, cols]
        if flip.any():
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
        if self.ra is not None:
            x = torch.stack([self._rand_augment(img, int(s)) for img, s in zip(x, seeds)])
        return x.contiguous()

    def _rand_augment(self, img: torch.Tensor, seed: int) -> torch.Tensor:
        """timm's RandAugment on one image through PIL; it draws from ``random`` and ``np.random``,
        seeded per image so a resumed or distributed run sees the same draws."""
        random.seed(seed)
        np.random.seed(seed)
        out = self.ra(Image.fromarray(img.permute(1, 2, 0).numpy()))  # (H, W, C) uint8
        return torch.from_numpy(np.array(out)).permute(2, 0, 1)


def _rand_augment(config: str, mean):
    from timm.data import rand_augment_transform
    try:
        return rand_augment_transform(config, {'img_mean': tuple(round(255 * m) for m in mean)})
    except (AssertionError, ValueError, KeyError, IndexError) as e:
        raise ConfigError(f"--auto-augment '{config}': not a timm RandAugment string such as "
                          f"'rand-m9-mstd0.5' ({e})") from None


def normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return (x.float().div_(255) - mean) / std  # (B, C, H, W) float32


class MemoryLoader:
    """Global batches of an in-memory dataset; this rank's slice of each, normalised."""

    def __init__(self, data: MemoryData, batch_size: int, train: bool, seed: int = 0,
                 mean=(0.5,) * 3, std=(0.5,) * 3, augment: BatchAugment | None = None,
                 rank: int = 0, world: int = 1) -> None:
        if train and batch_size % world:
            raise ConfigError(f'batch_size ({batch_size}) must be divisible by the number of processes ({world})')
        if train and len(data) < batch_size:
            raise ConfigError(f'batch_size ({batch_size}) is larger than the training set ({len(data)} images)')
        self.data, self.batch_size, self.train, self.seed = data, batch_size, train, seed
        self.augment, self.rank, self.world = augment, rank, world
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)
        self.num_images = len(data)

    def __len__(self) -> int:
        n = len(self.data)
        return n // self.batch_size if self.train else math.ceil(n / self.batch_size)

    def batches(self, epoch: int = 0, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.data)
        if self.train:
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(step_seed(self.seed, epoch, -1)))
        else:
            perm = torch.arange(n)
        for b in range(start, len(self)):
            idx = perm[b * self.batch_size:(b + 1) * self.batch_size]
            mine = torch.tensor_split(torch.arange(len(idx)), self.world)[self.rank]
            x = self.data.images[idx[mine]]  # (b, C, H, W) uint8
            if self.augment is not None:
                gen = torch.Generator().manual_seed(step_seed(self.seed, epoch, b))
                params = [p[mine] for p in self.augment.params(len(idx), gen)]  # drawn for the global batch
                x = self.augment(x, params)
            yield normalize(x, self.mean, self.std), self.data.labels[idx[mine]]


class StreamLoader:
    """A DataLoader over files, sharded by DistributedSampler, resumable at a batch index."""

    def __init__(self, dataset: FileDataset, batch_size: int, train: bool, seed: int, workers: int,
                 rank: int = 0, world: int = 1) -> None:
        if batch_size % world:
            raise ConfigError(f'batch_size ({batch_size}) must be divisible by the number of processes ({world})')
        if train and len(dataset) < batch_size:
            raise ConfigError(f'batch_size ({batch_size}) is larger than the training set ({len(dataset)} images)')
        self.dataset, self.local_bs, self.train, self.seed = dataset, batch_size // world, train, seed
        self.workers, self.rank, self.world = workers, rank, world
        self.num_images = len(dataset)
        # training: DistributedSampler (shuffled, equal shards); evaluation: every image exactly once
        self.sampler = torch.utils.data.DistributedSampler(
            dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True) if train else None

    def _indices(self, epoch: int) -> list[int]:
        if self.sampler is None:
            return list(range(self.rank, self.num_images, self.world))
        self.sampler.set_epoch(epoch)
        return list(self.sampler)

    def __len__(self) -> int:
        n = len(self.sampler) if self.sampler is not None else len(range(self.rank, self.num_images, self.world))
        return n // self.local_bs if self.train else math.ceil(n / self.local_bs)

    def batches(self, epoch: int = 0, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        indices = self._indices(epoch)[start * self.local_bs:]
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=self.local_bs, sampler=indices, num_workers=self.workers,
            drop_last=self.train, persistent_workers=False,
            generator=torch.Generator().manual_seed(step_seed(self.seed, epoch, start, self.rank)))
        yield from loader


@dataclass
class DataBundle:
    train: MemoryLoader | StreamLoader
    val: MemoryLoader | StreamLoader | None
    classes: list[str]
    split: dict | None  # {'seed', 'val_frac', 'num_samples', 'train', 'val'} when split here
    skipped: list

    @property
    def in_memory(self) -> bool:
        return isinstance(self.train, MemoryLoader)


def _named_memory(name: str, train: bool) -> MemoryData:
    if name == 'digits':
        return load_digits_memory()
    return load_torchvision_memory(name, Path.home() / '.cache' / 'rowcol' / name, train=train)


def _take(data: MemoryData | Samples, idx: list[int]):
    if isinstance(data, MemoryData):
        t = torch.tensor(idx, dtype=torch.long)
        return MemoryData(data.images[t], data.labels[t], data.classes, data.skipped)
    return Samples([data.paths[i] for i in idx], [data.labels[i] for i in idx], data.classes)


def _labels(data: MemoryData | Samples) -> list[int]:
    return data.labels.tolist() if isinstance(data, MemoryData) else data.labels


def _resize(data: MemoryData, size: int) -> MemoryData:
    """Resize every image of an in-memory set once (e.g. 8-px digits for a 16-px model)."""
    if data.images.shape[-1] == size and data.images.shape[-2] == size:
        return data
    x = F.interpolate(data.images.float(), size=(size, size), mode='bilinear', antialias=True, align_corners=False)
    return MemoryData(x.round_().clamp_(0, 255).to(torch.uint8), data.labels, data.classes, data.skipped)


def _small_images(samples: Samples, skip_bad: bool, max_bad: int) -> bool:
    """Whether the images are small enough to hold in memory, judged by the first readable one."""
    for path in samples.paths[:max_bad + 1 if skip_bad else 1]:
        try:
            w, h = load_image(path).size
            return max(w, h) <= MEMORY_MAX_PX
        except BadImageError:
            if not skip_bad:
                raise
    raise DataError(f'the first {max_bad + 1} image files cannot be read, more than --max-bad-images={max_bad}')


def _limit(data: MemoryData | Samples, limit: int | None):
    """A stratified subset of at most ``limit`` images (seed 0); all of ``data`` without a limit."""
    labels = _labels(data)
    return _take(data, stratified_subset(labels, limit, 0)) if limit and limit < len(labels) else data


def _load_source(path_or_name: str, split: str, cfg: DataConfig, img_size: int, progress: bool,
                 limit: int | None = None):
    """A dataset (MemoryData or Samples) for a --data / --val-data value; with ``limit``, a
    stratified subset of at most that many images, chosen before decoding."""
    if path_or_name in NAMED:
        return _limit(_resize(_named_memory(path_or_name, train=split == 'train'), img_size), limit)
    samples = _limit(scan_image_folder(find_image_folder(path_or_name, split)), limit)
    in_memory = cfg.in_memory if cfg.in_memory is not None else \
        _small_images(samples, cfg.skip_bad_images, cfg.max_bad_images)
    if not in_memory:
        return samples
    data = decode_to_memory(samples, size=img_size, skip_bad=cfg.skip_bad_images,
                            max_bad=cfg.max_bad_images, progress=progress)
    return data


def data_fingerprint(data: str, expect: int | None = None) -> str | None:
    """:func:`rowcol.apps.data.files_fingerprint` of the training images of an image folder; None for
    named datasets, and (without reading file sizes) when there are not ``expect`` images."""
    if data in NAMED:
        return None
    samples = scan_image_folder(find_image_folder(data, 'train'))
    if expect is not None and len(samples) != expect:
        return None
    return files_fingerprint(samples, data)


def _has_val_folder(data: str) -> bool:
    return data not in NAMED and (Path(data) / 'val').is_dir()


def eval_split(data: str) -> str:
    """The part of ``data`` that is meant for evaluation: CIFAR's test set, a ``val/`` folder,
    or (a bare folder of class folders) all of it."""
    if data in ('cifar10', 'cifar100'):
        return 'test'
    return 'val' if _has_val_folder(data) else 'train'


def _loader(data, cfg: DataConfig, train: bool, img_size: int, mean, std, d: Dist):
    if isinstance(data, MemoryData):
        aug = BatchAugment(cfg.crop_padding, cfg.hflip, cfg.auto_augment, mean) if train else None
        return MemoryLoader(data, cfg.batch_size, train, cfg.seed, mean, std, aug, d.rank, d.world)
    from timm.data import create_transform
    if train and cfg.auto_augment:
        _rand_augment(cfg.auto_augment, mean)  # a clear error for a bad string
    tf = create_transform(img_size, is_training=train, auto_augment=cfg.auto_augment if train else None,
                          re_prob=cfg.reprob if train else 0., hflip=cfg.hflip, mean=mean, std=std)
    return StreamLoader(FileDataset(data, tf, skip_bad=cfg.skip_bad_images), cfg.batch_size, train,
                        cfg.seed, cfg.workers, d.rank, d.world)


def build_data(cfg: DataConfig, img_size: int, mean, std, d: Dist = Dist(), progress: bool = False) -> DataBundle:
    """Training and validation loaders for ``cfg``; the validation split is made here if asked.

    Validation comes from ``--val-data``, else ``--val-split`` of the training data, else the
    data's own evaluation part (:func:`eval_split`) when it has one. ``cfg`` may also be a
    TrainConfig (its data part is taken).
    """
    cfg = DataConfig.from_train(cfg)
    if d.world > 1 and cfg.data in NAMED and not d.main:
        barrier(d)  # rank 0 downloads named datasets first
    train = _load_source(cfg.data, 'train', cfg, img_size, progress)
    if d.world > 1 and cfg.data in NAMED and d.main:
        barrier(d)
    if len(train.classes) < 2:  # cross-entropy over one class is 0 from the first step: nothing to learn
        raise DataError(f'{cfg.data}: one class ({train.classes[0]!r}); a classifier needs at least two class '
                        'folders (<root>/<class>/<image>)')
    split, val = None, None
    if cfg.val_data:
        val = _load_source(cfg.val_data, eval_split(cfg.val_data), cfg, img_size, progress)
    elif cfg.val_split:
        tr_idx, va_idx = stratified_split(_labels(train), cfg.val_split, cfg.split_seed)
        split = dict(seed=cfg.split_seed, val_frac=cfg.val_split, num_samples=len(_labels(train)), train=tr_idx,
                     val=va_idx)
        train, val = _take(train, tr_idx), _take(train, va_idx)
    elif eval_split(cfg.data) != 'train':
        val = _load_source(cfg.data, eval_split(cfg.data), cfg, img_size, progress)
    if val is not None and val.classes != train.classes:
        raise DataError(f'validation classes {val.classes[:5]}... differ from training classes {train.classes[:5]}...')
    if cfg.subset:
        if cfg.subset > len(_labels(train)):
            raise ConfigError(f'--subset {cfg.subset} is larger than the training set ({len(_labels(train))} images)')
        train = _take(train, stratified_subset(_labels(train), cfg.subset, cfg.seed))
    skipped = list(getattr(train, 'skipped', [])) + list(getattr(val, 'skipped', []) if val is not None else [])
    return DataBundle(
        train=_loader(train, cfg, True, img_size, mean, std, d),
        val=_loader(val, cfg, False, img_size, mean, std, d) if val is not None else None,
        classes=list(train.classes), split=split, skipped=skipped)


def build_eval_data(data: str, cfg: DataConfig, img_size: int, mean, std, split: dict | None = None,
                    d: Dist = Dist(), progress: bool = False, limit: int | None = None):
    """A loader over ``data`` for evaluation, and its classes.

    With ``split`` (a run's ``split.json``), the validation indices of the run's training
    images; otherwise the data's evaluation part (:func:`eval_split`), of which ``limit`` keeps a
    stratified subset. ``cfg`` may also be a TrainConfig (its data part is taken).
    """
    cfg = DataConfig.from_train(cfg)
    if split is None:
        source = _load_source(data, eval_split(data), cfg, img_size, progress, limit)
    else:
        source = _load_source(data, 'train', cfg, img_size, progress)
        if len(_labels(source)) != split['num_samples']:
            raise DataError(f'{data}: {len(_labels(source))} images, but the run\'s split was made from '
                            f'{split["num_samples"]}; pass --split all to score every image')
        source = _take(source, split['val'])
    return _loader(source, cfg, False, img_size, mean, std, d), list(source.classes)


def seed_step_rngs(seed: int, epoch: int, batch: int, rank: int) -> None:
    """Seed the global RNGs that dropout, drop-path, Mixup and random erasing draw from."""
    s = step_seed(seed, epoch, batch, rank)
    torch.manual_seed(s)
    random.seed(s)
    np.random.seed(s % 2 ** 32)
