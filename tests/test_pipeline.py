"""Batches: augmentation correctness, determinism per (seed, epoch, batch), DDP slices, splits."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rowcol.apps.config import DataConfig, TrainConfig, resolve_config
from rowcol.apps.data import MemoryData
from rowcol.apps import pipeline
from rowcol.apps.pipeline import BatchAugment, MemoryLoader, build_data, build_eval_data, eval_split
from rowcol.apps.runtime import Dist


def _data(n=24, size=8):
    g = torch.Generator().manual_seed(0)
    return MemoryData(torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g),
                      torch.arange(n) % 3, ['a', 'b', 'c'])


def test_crop_and_flip_are_exact():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.uint8).view(2, 3, 4, 4)
    aug = BatchAugment(padding=1, hflip=0.5)
    oy, ox = torch.tensor([0, 2]), torch.tensor([1, 0])
    flip = torch.tensor([False, True])
    out = aug(x, (oy, ox, flip, torch.zeros(2, dtype=torch.long)))
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1))
    torch.testing.assert_close(out[0], padded[0, :, 0:4, 1:5])
    torch.testing.assert_close(out[1], padded[1, :, 2:6, 0:4].flip(-1))
    assert torch.equal(BatchAugment(0, 0.)(x, BatchAugment(0, 0.).params(2, torch.Generator())), x)


@pytest.mark.parametrize('auto_augment', [None, 'rand-m9-mstd0.5'])
def test_batches_depend_only_on_seed_epoch_batch(auto_augment):
    data = _data()
    make = lambda rank=0, world=1: MemoryLoader(data, 8, True, seed=5, augment=BatchAugment(2, .5, auto_augment),  # noqa: E731
                                                rank=rank, world=world)
    full = list(make().batches(epoch=1))
    again = list(make().batches(epoch=1))
    resumed = list(make().batches(epoch=1, start=2))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(full, again))
    assert torch.equal(resumed[0][0], full[2][0]) and torch.equal(resumed[0][1], full[2][1])
    assert not torch.equal(full[0][0], next(make().batches(epoch=2))[0])  # a new order each epoch
    # two processes: each gets its slice of the very same global batch
    r0, r1 = list(make(0, 2).batches(epoch=1)), list(make(1, 2).batches(epoch=1))
    for (x, y), (x0, y0), (x1, y1) in zip(full, r0, r1):
        assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)


def test_eval_loader_covers_every_image_once_across_ranks():
    data = _data(n=10)
    seen = []
    for rank in range(3):
        for _, y in MemoryLoader(data, 4, False, rank=rank, world=3).batches():
            seen.append(len(y))
    assert sum(seen) == 10


def _split_layout(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for part, n in (('train', 6), ('val', 2)):
        for c in ('x', 'y'):
            (root / part / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(root / part / c / f'{i}.png')
    return root


def test_val_folder_and_val_data_use_the_val_part(tmp_path):
    root = _split_layout(tmp_path / 'ds')
    assert eval_split(str(root)) == 'val' and eval_split('cifar10') == 'test' and eval_split(str(root / 'train')) == 'train'
    cfg = DataConfig(data=str(root), batch_size=4)
    bundle = build_data(cfg, 16, (0.5,) * 3, (0.5,) * 3, Dist())
    assert bundle.train.num_images == 12 and bundle.val.num_images == 4
    cfg = resolve_config('cifar_vit', data=str(root / 'train'), val_data=str(root), batch_size=4).data_config()
    assert build_data(cfg, 16, (0.5,) * 3, (0.5,) * 3, Dist()).val.num_images == 4


def test_validation_split_is_shared_by_every_run_seed():
    """The split depends on split_seed only: runs with different --seed validate on the same images."""
    splits = [build_data(resolve_config('digits', seed=s, batch_size=8).data_config(), 16, (.5,) * 3, (.5,) * 3)
              .split['val'] for s in (0, 1)]
    assert splits[0] == splits[1]
    other = build_data(resolve_config('digits', split_seed=7, batch_size=8).data_config(), 16, (.5,) * 3,
                       (.5,) * 3).split['val']
    assert other != splits[0]


def test_eval_limit_takes_every_class_before_decoding(tmp_path, monkeypatch):
    root = _split_layout(tmp_path / 'ds') / 'train'  # classes x, y: 6 images each, sorted by class
    cfg = DataConfig(data=str(root), batch_size=4)
    decoded = []
    real = pipeline.decode_to_memory
    monkeypatch.setattr(pipeline, 'decode_to_memory', lambda s, **kw: decoded.append(len(s)) or real(s, **kw))
    loader, classes = build_eval_data(str(root), cfg, 8, (.5,) * 3, (.5,) * 3, limit=4)
    labels = torch.cat([y for _, y in loader.batches()])
    assert decoded == [4] and sorted(labels.tolist()) == [0, 0, 1, 1]  # not the first 4 files (all 'x')
    loader, _ = build_eval_data('digits', resolve_config('digits').data_config(), 16, (.5,) * 3, (.5,) * 3, limit=50)
    assert loader.num_images == 50 and len(torch.unique(torch.cat([y for _, y in loader.batches()]))) == 10


def test_data_config_is_the_data_part_of_a_train_config():
    """DataConfig's defaults are TrainConfig's; the pipeline takes either, reading the same fields."""
    assert DataConfig() == TrainConfig().data_config()
    cfg = resolve_config('digits', seed=2, batch_size=8, subset=64, hflip=0.25)
    assert cfg.data_config() == DataConfig.from_train(cfg) == DataConfig(
        data='digits', val_split=0.2, seed=2, batch_size=8, subset=64, crop_padding=1, hflip=0.25, workers=2)
    a = build_data(cfg, 16, (.5,) * 3, (.5,) * 3)
    b = build_data(cfg.data_config(), 16, (.5,) * 3, (.5,) * 3)
    assert a.split == b.split and all(torch.equal(x[0], y[0]) for x, y in zip(a.train.batches(1), b.train.batches(1)))
