"""Tests for rowcol.apps.data: folder discovery, safe decoding, in-memory datasets and splits."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rowcol.apps.data import (
    DEFAULT_BACKGROUND, FileDataset, MemoryData, Samples, decode_to_memory, find_image_folder,
    load_digits_memory, load_image, load_split, load_torchvision_memory, save_split,
    scan_image_folder, stratified_split, stratified_subset,
)
from rowcol.errors import BadImageError, ConfigError, DataError

CIFAR_TRAIN = Path(__file__).resolve().parents[1].parent / 'shared/data/cifar10/train'


def _rgb(seed: int, size: tuple[int, int] = (6, 4)) -> Image.Image:
    """A random RGB image of ``size`` (width, height)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _save(path: Path, image: Image.Image) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def _folder(root: Path, counts: dict[str, int], size: tuple[int, int] = (6, 4)) -> Path:
    """An ImageFolder with ``counts[class]`` random PNGs per class."""
    for k, (name, count) in enumerate(counts.items()):
        for i in range(count):
            _save(root / name / f'{i:03d}.png', _rgb(100 * k + i, size))
    return root


def _samples(paths: list[Path]) -> Samples:
    return Samples([str(p) for p in paths], [0] * len(paths), ['only'])


def _truncated_jpeg(path: Path) -> Path:
    _save(path, _rgb(0, (64, 64)))
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    return path


def _bad_files(root: Path) -> dict[str, Path]:
    empty = root / 'empty.jpg'
    empty.parent.mkdir(parents=True, exist_ok=True)
    empty.write_bytes(b'')
    text = root / 'text.jpg'
    text.write_text('not an image at all')
    return {'empty': empty, 'truncated': _truncated_jpeg(root / 'cut.jpg'), 'text': text}


# ---------------------------------------------------------------------------- folders


def test_find_image_folder_plain_root(tmp_path: Path) -> None:
    root = _folder(tmp_path / 'data', {'cat': 1, 'dog': 1})
    assert find_image_folder(root) == root
    assert find_image_folder(root, 'val') == root


def test_find_image_folder_split_layout(tmp_path: Path) -> None:
    _folder(tmp_path / 'train', {'cat': 1})
    _folder(tmp_path / 'val', {'cat': 1})
    assert find_image_folder(tmp_path) == tmp_path / 'train'
    assert find_image_folder(str(tmp_path), 'val') == tmp_path / 'val'
    with pytest.raises(DataError, match='test'):
        find_image_folder(tmp_path, 'test')


def test_find_image_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match='nowhere'):
        find_image_folder(tmp_path / 'nowhere')
    file = tmp_path / 'file.txt'
    file.write_text('x')
    with pytest.raises(DataError, match='not a directory'):
        find_image_folder(file)
    (tmp_path / 'empty').mkdir()
    with pytest.raises(DataError, match='no class folders'):
        find_image_folder(tmp_path / 'empty')
    (tmp_path / 'bare' / 'train').mkdir(parents=True)
    with pytest.raises(DataError, match='train'):
        find_image_folder(tmp_path / 'bare')


def test_scan_image_folder_order_and_filters(tmp_path: Path) -> None:
    _save(tmp_path / 'zebra' / 'b.png', _rgb(0))
    _save(tmp_path / 'zebra' / 'A.JPG', _rgb(1))
    _save(tmp_path / 'zebra' / 'nested' / 'c.Png', _rgb(2))
    _save(tmp_path / 'ant' / 'x.jpeg', _rgb(3))
    _save(tmp_path / 'ant' / '.hidden.png', _rgb(4))
    (tmp_path / 'ant' / 'notes.txt').write_text('ignored')
    (tmp_path / 'ant' / 'fake.jpg').write_text('kept, fails at decode time')
    _save(tmp_path / '.cache' / 'y.png', _rgb(5))
    samples = scan_image_folder(tmp_path)
    assert samples.classes == ['ant', 'zebra']
    names = [Path(p).relative_to(tmp_path).as_posix() for p in samples.paths]
    assert names == ['ant/fake.jpg', 'ant/x.jpeg', 'zebra/A.JPG', 'zebra/b.png',
                     'zebra/nested/c.Png']
    assert samples.labels == [0, 0, 1, 1, 1]
    assert len(samples) == 5


def test_scan_image_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match='missing'):
        scan_image_folder(tmp_path / 'missing')
    with pytest.raises(DataError, match='no class folders'):
        scan_image_folder(tmp_path)
    _folder(tmp_path, {'full': 2})
    (tmp_path / 'hollow_class').mkdir()
    (tmp_path / 'hollow_class' / 'readme.txt').write_text('no images here')
    with pytest.raises(DataError, match='hollow_class'):
        scan_image_folder(tmp_path)


# ---------------------------------------------------------------------------- load_image


@pytest.mark.parametrize('kind', ['empty', 'truncated', 'text'])
def test_load_image_bad_files(tmp_path: Path, kind: str) -> None:
    path = _bad_files(tmp_path)[kind]
    with pytest.raises(BadImageError, match=path.name) as info:
        load_image(path)
    assert info.value.path == str(path)
    assert info.value.reason


def test_load_image_reasons(tmp_path: Path) -> None:
    bad = _bad_files(tmp_path)
    with pytest.raises(BadImageError, match='0 bytes'):
        load_image(bad['empty'])
    with pytest.raises(BadImageError, match='truncated'):
        load_image(bad['truncated'])


def test_load_image_rgb_is_loaded(tmp_path: Path) -> None:
    image = _rgb(7)
    loaded = load_image(_save(tmp_path / 'a.png', image))
    assert loaded.mode == 'RGB'
    assert np.array_equal(np.asarray(loaded), np.asarray(image))


def test_load_image_cmyk(tmp_path: Path) -> None:
    red = _save(tmp_path / 'red.jpg', Image.new('CMYK', (8, 8), (0, 255, 255, 0)))
    gray = _save(tmp_path / 'gray.tif', Image.new('CMYK', (8, 8), (0, 0, 0, 128)))
    assert load_image(red).mode == 'RGB'
    assert np.abs(np.asarray(load_image(red), np.int32) - (255, 0, 0)).max() <= 8
    assert np.abs(np.asarray(load_image(gray), np.int32) - 127).max() <= 2


def test_load_image_grayscale_and_bilevel(tmp_path: Path) -> None:
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    loaded = np.asarray(load_image(_save(tmp_path / 'g.png', Image.fromarray(gray))))
    assert loaded.shape == (3, 4, 3)
    assert all(np.array_equal(loaded[..., c], gray) for c in range(3))
    bilevel = Image.new('1', (2, 2), 1)
    bilevel.putpixel((0, 0), 0)
    loaded = np.asarray(load_image(_save(tmp_path / 'b.png', bilevel)))
    assert loaded[0, 0].tolist() == [0, 0, 0] and loaded[1, 1].tolist() == [255, 255, 255]


def test_load_image_rgba_composited(tmp_path: Path) -> None:
    rgba = np.zeros((1, 3, 4), np.uint8)
    rgba[0, 0] = (0, 0, 0, 0)        # fully transparent black -> background
    rgba[0, 1] = (0, 0, 0, 128)      # half-transparent black over white -> mid gray
    rgba[0, 2] = (10, 200, 30, 255)  # opaque -> unchanged
    path = _save(tmp_path / 'a.png', Image.fromarray(rgba, 'RGBA'))
    loaded = np.asarray(load_image(path), np.int32)
    assert loaded[0, 0].tolist() == list(DEFAULT_BACKGROUND)
    assert np.abs(loaded[0, 1] - 127).max() <= 1
    assert loaded[0, 2].tolist() == [10, 200, 30]
    on_blue = np.asarray(load_image(path, background=(0, 0, 255)))
    assert on_blue[0, 0].tolist() == [0, 0, 255]


def test_load_image_la(tmp_path: Path) -> None:
    la = Image.merge('LA', [Image.new('L', (2, 1), 40), Image.new('L', (2, 1), 0)])
    la.putpixel((1, 0), (40, 255))
    loaded = np.asarray(load_image(_save(tmp_path / 'la.png', la), background=(200, 0, 0)))
    assert loaded[0, 0].tolist() == [200, 0, 0]
    assert loaded[0, 1].tolist() == [40, 40, 40]


def test_load_image_palette(tmp_path: Path) -> None:
    palette = Image.new('P', (2, 1))
    palette.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    palette.putpixel((1, 0), 1)
    loaded = np.asarray(load_image(_save(tmp_path / 'p.png', palette)))
    assert loaded[0].tolist() == [[255, 0, 0], [0, 255, 0]]
    palette.info['transparency'] = 0
    see_through = _save(tmp_path / 'pt.png', palette)
    with Image.open(see_through) as reopened:
        assert reopened.info.get('transparency') == 0
    loaded = np.asarray(load_image(see_through, background=(1, 2, 3)))
    assert loaded[0].tolist() == [[1, 2, 3], [0, 255, 0]]


def test_load_image_sixteen_bit_scaled_not_clipped(tmp_path: Path) -> None:
    values = np.array([[65535, 32768, 257, 0]], dtype=np.uint16)
    path = _save(tmp_path / 'deep.png', Image.fromarray(values))
    with Image.open(path) as reopened:
        assert reopened.mode.startswith('I')
    loaded = np.asarray(load_image(path))
    assert loaded[0, :, 0].tolist() == [255, 128, 1, 0]
    assert (loaded == loaded[..., :1]).all()


def test_load_image_float_rejected(tmp_path: Path) -> None:
    path = _save(tmp_path / 'float.tif', Image.fromarray(np.ones((2, 2), np.float32)))
    with pytest.raises(BadImageError, match='mode F'):
        load_image(path)


# ---------------------------------------------------------------------------- in memory


def test_decode_to_memory_round_trip(tmp_path: Path) -> None:
    images = [_rgb(i) for i in range(5)]
    paths = [_save(tmp_path / f'{i}.png', im) for i, im in enumerate(images)]
    samples = Samples([str(p) for p in paths], [0, 1, 0, 1, 1], ['a', 'b'])
    data = decode_to_memory(samples, progress=True)
    assert data.images.dtype == torch.uint8 and data.images.is_contiguous()
    assert data.images.shape == (5, 3, 4, 6)
    expected = np.stack([np.asarray(im).transpose(2, 0, 1) for im in images])
    assert np.array_equal(data.images.numpy(), expected)
    assert data.labels.dtype == torch.int64 and data.labels.tolist() == [0, 1, 0, 1, 1]
    assert data.classes == ['a', 'b'] and data.skipped == [] and len(data) == 5


def test_decode_to_memory_sizes(tmp_path: Path) -> None:
    same = _save(tmp_path / 'same.png', _rgb(0, (6, 4)))
    odd = _save(tmp_path / 'odd_one.png', _rgb(1, (5, 5)))
    samples = _samples([same, odd])
    with pytest.raises(DataError, match='odd_one.png') as info:
        decode_to_memory(samples)
    assert '5x5' in str(info.value) and '6x4' in str(info.value) and 'size' in str(info.value)
    data = decode_to_memory(samples, size=8)
    assert data.images.shape == (2, 3, 8, 8)
    kept = _save(tmp_path / 'kept.png', _rgb(2, (8, 8)))
    exact = decode_to_memory(_samples([kept]), size=8)
    assert np.array_equal(exact.images[0].permute(1, 2, 0).numpy(), np.asarray(_rgb(2, (8, 8))))
    with pytest.raises(ConfigError):
        decode_to_memory(samples, size=0)


def test_decode_to_memory_bad_files(tmp_path: Path) -> None:
    bad = _bad_files(tmp_path / 'bad')
    good = [_save(tmp_path / f'good{i}.png', _rgb(i)) for i in range(3)]
    paths = [good[0], bad['empty'], good[1], bad['truncated'], bad['text'], good[2]]
    samples = Samples([str(p) for p in paths], [0, 1, 2, 3, 4, 5], list('abcdef'))
    with pytest.raises(BadImageError, match='empty.jpg'):
        decode_to_memory(samples)
    data = decode_to_memory(samples, skip_bad=True)
    assert data.labels.tolist() == [0, 2, 5]
    assert data.images.shape == (3, 3, 4, 6)
    assert np.array_equal(data.images[2].permute(1, 2, 0).numpy(), np.asarray(_rgb(2)))
    assert [Path(p).name for p, _ in data.skipped] == ['empty.jpg', 'cut.jpg', 'text.jpg']
    assert decode_to_memory(samples, skip_bad=True, max_bad=3).labels.tolist() == [0, 2, 5]
    with pytest.raises(DataError, match='max_bad=2') as info:
        decode_to_memory(samples, skip_bad=True, max_bad=2)
    assert '3 of the first 5' in str(info.value) and 'empty.jpg' in str(info.value)


def test_decode_to_memory_all_bad(tmp_path: Path) -> None:
    samples = _samples(list(_bad_files(tmp_path).values()))
    with pytest.raises(DataError, match='none of the 3'):
        decode_to_memory(samples, skip_bad=True)
    with pytest.raises(DataError):
        decode_to_memory(Samples([], [], []))


def test_load_digits_memory() -> None:
    data = load_digits_memory()
    assert isinstance(data, MemoryData)
    assert data.images.shape == (1797, 3, 8, 8) and data.images.dtype == torch.uint8
    assert data.images.is_contiguous()
    assert int(data.images.min()) == 0 and int(data.images.max()) == 255
    assert torch.equal(data.images[:, 0], data.images[:, 2])
    assert data.labels.dtype == torch.int64 and sorted(set(data.labels.tolist())) == list(range(10))
    assert data.classes == [str(d) for d in range(10)]


def test_load_torchvision_memory_offline(tmp_path: Path) -> None:
    with pytest.raises(DataError, match='--data') as info:
        load_torchvision_memory('cifar10', tmp_path, train=True, download=False)
    assert 'downloaded' in str(info.value)
    with pytest.raises(ConfigError, match='mnist'):
        load_torchvision_memory('mnist', tmp_path, train=True, download=False)


# ---------------------------------------------------------------------------- streaming


def test_file_dataset(tmp_path: Path) -> None:
    bad = _bad_files(tmp_path / 'bad')
    good = [_save(tmp_path / f'good{i}.png', _rgb(i)) for i in range(2)]
    paths = [good[0], bad['truncated'], bad['text'], good[1]]
    samples = Samples([str(p) for p in paths], [0, 1, 2, 3], list('abcd'))
    with pytest.raises(BadImageError, match='cut.jpg'):
        FileDataset(samples)[1]
    dataset = FileDataset(samples, transform=lambda im: np.asarray(im).sum(), skip_bad=True)
    assert len(dataset) == 4
    assert dataset[1][1] == 3 and dataset.skipped == 2
    assert dataset[1] == dataset[3] and dataset.skipped == 4
    plain = FileDataset(samples)
    image, label = plain[-1]
    assert label == 3 and image.mode == 'RGB'
    with pytest.raises(IndexError):
        plain[4]


def test_file_dataset_all_bad(tmp_path: Path) -> None:
    dataset = FileDataset(_samples(list(_bad_files(tmp_path).values())), skip_bad=True)
    with pytest.raises(DataError, match='none of the 3'):
        dataset[0]


# ---------------------------------------------------------------------------- splits


def test_stratified_split_counts() -> None:
    labels = [0] * 100 + [1] * 30 + [2] * 3 + [3] * 1
    train, val = stratified_split(labels, 0.1, seed=0)
    val_counts = Counter(labels[i] for i in val)
    assert val_counts == {0: 10, 1: 3, 2: 1}
    assert set(train).isdisjoint(val)
    assert sorted(train + val) == list(range(len(labels)))
    assert train == sorted(train) and val == sorted(val)
    assert 133 in train  # a single-item class stays in training


def test_stratified_split_seeded() -> None:
    labels = torch.arange(200) % 4
    first = stratified_split(labels, 0.2, seed=1)
    assert first == stratified_split(labels.tolist(), 0.2, seed=1)
    assert first != stratified_split(labels, 0.2, seed=2)
    assert Counter(labels[first[1]].tolist()) == {0: 10, 1: 10, 2: 10, 3: 10}


@pytest.mark.parametrize('frac', [0, 1, -0.1, 1.5, float('nan')])
def test_stratified_split_rejects_fraction(frac: float) -> None:
    with pytest.raises(ConfigError):
        stratified_split([0, 1, 0, 1], frac, seed=0)


def test_stratified_subset() -> None:
    labels = [0] * 60 + [1] * 30 + [2] * 10
    subset = stratified_subset(labels, 10, seed=3)
    assert Counter(labels[i] for i in subset) == {0: 6, 1: 3, 2: 1}
    assert subset == sorted(subset) and len(set(subset)) == 10
    assert subset == stratified_subset(labels, 10, seed=3)
    assert subset != stratified_subset(labels, 10, seed=4)
    odd = stratified_subset(labels, 7, seed=0)  # exact 4.2, 2.1, 0.7 -> 4, 2, 1
    assert Counter(labels[i] for i in odd) == {0: 4, 1: 2, 2: 1}
    assert stratified_subset(labels, 100, seed=0) == list(range(100))
    for n in (0, 101):
        with pytest.raises(ConfigError):
            stratified_subset(labels, n, seed=0)


def test_split_file_round_trip(tmp_path: Path) -> None:
    path = tmp_path / 'run' / 'split.json'
    save_split(path, [0, 2, 3], torch.tensor([1, 4]), seed=7, val_frac=0.4, num_samples=5)
    record = load_split(path)
    assert record['train'] == [0, 2, 3] and record['val'] == [1, 4]
    assert record['seed'] == 7 and record['val_frac'] == 0.4 and record['num_samples'] == 5
    assert [p.name for p in path.parent.iterdir()] == ['split.json']


@pytest.mark.parametrize('content', [
    'not json', '[1, 2]', '{"seed": 1}',
    json.dumps({'seed': 1, 'val_frac': 0.5, 'num_samples': 3, 'train': [0, 1], 'val': [1]}),
    json.dumps({'seed': 1, 'val_frac': 0.5, 'num_samples': 3, 'train': [0], 'val': [9]}),
])
def test_load_split_broken(tmp_path: Path, content: str) -> None:
    path = tmp_path / 'broken_split.json'
    path.write_text(content)
    with pytest.raises(DataError, match='broken_split.json'):
        load_split(path)
    with pytest.raises(DataError, match='absent.json'):
        load_split(tmp_path / 'absent.json')


# ---------------------------------------------------------------------------- real data


def test_real_cifar10_folder() -> None:
    if not CIFAR_TRAIN.is_dir():
        pytest.skip(f'{CIFAR_TRAIN} is absent')
    samples = scan_image_folder(find_image_folder(CIFAR_TRAIN.parent))
    assert len(samples.paths) == 50_000 and len(samples.classes) == 10
    assert samples.classes[0] == 'airplane'
    assert Counter(samples.labels) == {k: 5_000 for k in range(10)}
    subset = stratified_subset(samples.labels, 200, seed=0)
    picked = Samples([samples.paths[i] for i in subset], [samples.labels[i] for i in subset],
                     samples.classes)
    data = decode_to_memory(picked)
    assert data.images.shape == (200, 3, 32, 32) and data.skipped == []
    assert Counter(data.labels.tolist()) == {k: 20 for k in range(10)}
    assert 0.3 < data.images.float().mean().item() / 255 < 0.65


def test_bad_image_error_survives_a_dataloader_worker():
    """DataLoader re-raises a worker's exception as type(message): one argument must work."""
    from rowcol.errors import BadImageError
    err = BadImageError('Caught BadImageError in DataLoader worker process 0: x.jpg: truncated')
    assert 'x.jpg' in str(err) and err.reason == ''
    assert str(BadImageError('a.png', 'empty file')) == 'a.png: empty file'
