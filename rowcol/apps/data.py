"""Image datasets: find and scan folders, decode images safely, split and subset labels.

Two ways to feed a model:

* :func:`decode_to_memory` decodes a small dataset (CIFAR-sized) once into one uint8
  tensor held in :class:`MemoryData`; :func:`load_digits_memory` and
  :func:`load_torchvision_memory` build the same container from bundled or downloadable
  datasets.
* :class:`FileDataset` streams files through a transform, for datasets too big to hold.

Both read files with :func:`load_image`, which always returns a fully loaded RGB image and
turns every undecodable file (empty, truncated, not an image, unsupported pixel format) into
:class:`~rowcol.errors.BadImageError`. Truncated files raise because Pillow's default
``ImageFile.LOAD_TRUNCATED_IMAGES = False`` is left alone: nothing here changes PIL globals.

Folder layout follows ``torchvision.datasets.ImageFolder`` (class folders sorted by name,
``IMG_EXTENSIONS`` matched case-insensitively), so label indices agree with torchvision.
:func:`stratified_split` and :func:`stratified_subset` pick seeded, class-balanced index
sets, and :func:`save_split` / :func:`load_split` keep a validation split for evaluation.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import struct
import tarfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS
from tqdm import tqdm

from rowcol.apps.fileio import atomic_write
from rowcol.errors import BadImageError, ConfigError, DataError

__all__ = [
    'DEFAULT_BACKGROUND', 'Samples', 'MemoryData', 'FileDataset',
    'find_image_folder', 'scan_image_folder', 'load_image', 'decode_to_memory',
    'stratified_split', 'stratified_subset', 'load_digits_memory', 'load_torchvision_memory',
    'save_split', 'load_split',
]

log = logging.getLogger(__name__)

DEFAULT_BACKGROUND: tuple[int, int, int] = (255, 255, 255)
SPLIT_NAMES = ('train', 'val')
SPLIT_KEYS = ('seed', 'val_frac', 'num_samples', 'train', 'val')

_ALPHA_MODES = frozenset({'RGBA', 'RGBa', 'LA', 'La', 'PA'})
_SIXTEEN_BIT_MODES = frozenset({'I;16', 'I;16L', 'I;16B', 'I;16N', 'I'})
# Pillow's format plugins raise any of these on a malformed or unreadable file.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, TypeError, IndexError, EOFError,
                  struct.error, Image.DecompressionBombError)
# What a failed torchvision download, a bad archive or a corrupt pickle raises.
_FETCH_ERRORS = (OSError, RuntimeError, EOFError, tarfile.TarError, pickle.UnpicklingError)


@dataclass
class Samples:
    """A labelled list of image files, not decoded; ``labels`` index into ``classes``."""

    paths: list[str]
    labels: list[int]
    classes: list[str]

    def __len__(self) -> int:
        return len(self.paths)


@dataclass
class MemoryData:
    """A whole dataset decoded once: ``images`` (N, 3, H, W) uint8, ``labels`` (N,) int64."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.labels)


# ---------------------------------------------------------------------------- folders


def _visible_dirs(folder: Path) -> list[str]:
    """Sorted names of the non-hidden subdirectories of ``folder``."""
    with os.scandir(folder) as entries:
        return sorted(e.name for e in entries if e.is_dir() and not e.name.startswith('.'))


def _existing_dir(root: str | Path) -> Path:
    path = Path(root).expanduser()
    if not path.exists():
        raise DataError(f'{path}: no such directory')
    if not path.is_dir():
        raise DataError(f'{path}: not a directory')
    return path


def find_image_folder(root: str | Path, split: str = 'train') -> Path:
    """The ImageFolder root to read for ``split``.

    ``root`` is either an ImageFolder root (class folders directly inside; returned as is
    for any ``split``) or a split layout with ``train/`` and/or ``val/`` inside (ImageNet
    style; ``root / split`` is returned).
    """
    path = _existing_dir(root)
    subdirs = _visible_dirs(path)
    if any(name in SPLIT_NAMES for name in subdirs):
        if split not in subdirs:
            raise DataError(f'{path}: no {split!r} split folder (found: {", ".join(subdirs)})')
        path = path / split
        subdirs = _visible_dirs(path)
    if not subdirs:
        raise DataError(f'{path}: no class folders inside (expected <root>/<class>/<image>)')
    return path


def _is_image_name(name: str) -> bool:
    return not name.startswith('.') and name.lower().endswith(IMG_EXTENSIONS)


def _image_files(class_dir: Path) -> list[str]:
    """Image files under ``class_dir`` (recursively), in torchvision ImageFolder order.

    The folders inside ``class_dir`` are scanned first; then each linked folder is followed
    only if it leads to a folder inside ``class_dir`` that has not been scanned: a link out of
    the class folder (``ln -s .. cat/loop``) would label other classes' images with this class,
    a link back to a scanned folder would count images twice or loop. Skipped links are logged
    as a warning.
    """
    top = os.path.realpath(class_dir)
    seen: set[str] = set()
    found: list[tuple[str, str]] = []
    links: list[str] = []

    def scan(start: str) -> None:  # the real folders under start; links are only collected
        for dirpath, dirnames, filenames in os.walk(start):
            seen.add(os.path.realpath(dirpath))
            dirnames[:] = [d for d in dirnames if not d.startswith('.')]
            links.extend(sorted(p for p in (os.path.join(dirpath, d) for d in dirnames) if os.path.islink(p)))
            found.extend((dirpath, name) for name in filenames if _is_image_name(name))

    scan(str(class_dir))
    skipped = []
    for link in links:  # grows while links inside followed links are found
        real = os.path.realpath(link)
        if real in seen or not (real == top or real.startswith(top.rstrip(os.sep) + os.sep)):
            skipped.append(f'{link} -> {real}')
        else:
            scan(link)
    if skipped:
        listed = '; '.join(skipped[:5]) + (' ...' if len(skipped) > 5 else '')
        log.warning('%s: skipped %d linked folder(s) that lead out of the class folder or to a folder already '
                    'scanned: %s', class_dir, len(skipped), listed)
    return [os.path.join(dirpath, name) for dirpath, name in sorted(found)]


def scan_image_folder(root: str | Path) -> Samples:
    """List the images of an ImageFolder root: ``root/<class>/**/<image>``.

    Files whose names lack an image extension and hidden files/folders are ignored. Files
    with an image extension are kept even if they are not images; they fail when decoded.
    """
    path = _existing_dir(root)
    classes = _visible_dirs(path)
    if not classes:
        raise DataError(f'{path}: no class folders inside (expected <root>/<class>/<image>)')
    paths: list[str] = []
    labels: list[int] = []
    empty: list[str] = []
    for label, name in enumerate(classes):
        files = _image_files(path / name)
        if not files:
            empty.append(name)
        paths.extend(files)
        labels.extend([label] * len(files))
    if empty:
        raise DataError(f'{path}: class folder(s) with no images '
                        f'({", ".join(IMG_EXTENSIONS)}): {", ".join(empty)}')
    return Samples(paths, labels, classes)


# ---------------------------------------------------------------------------- images


def _reason(path: str | Path, err: Exception) -> str:
    if isinstance(err, Image.UnidentifiedImageError):
        empty = os.path.getsize(path) == 0
        return 'empty file (0 bytes)' if empty else 'not a recognised image file'
    return str(err) or type(err).__name__


def _open_loaded(path: str | Path) -> Image.Image:
    """Open and fully decode ``path``; the file is closed on return."""
    try:
        with open(path, 'rb') as file:
            image = Image.open(file)
            image.load()
            return image
    except _DECODE_ERRORS as err:
        raise BadImageError(path, _reason(path, err)) from err


def _from_sixteen_bit(image: Image.Image) -> Image.Image:
    """16-bit grayscale (0..65535) to RGB, scaled by 1/257 with rounding (65535 -> 255)."""
    values = np.asarray(image)
    if values.size and (values.min() < 0 or values.max() > 65535):
        raise ValueError(f'mode {image.mode} pixels outside 0..65535 are not supported')
    scaled = ((values.astype(np.uint32) + 128) // 257).astype(np.uint8)
    return Image.fromarray(scaled).convert('RGB')


def _composite(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Alpha-composite ``image`` onto an opaque ``background`` colour."""
    rgba = image.convert('RGBA')
    canvas = Image.new('RGB', rgba.size, tuple(background))
    canvas.paste(rgba, mask=rgba)
    return canvas


def _to_rgb(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Any decoded mode to RGB; raises ValueError for pixel formats with no fixed range."""
    if image.mode == 'F':
        raise ValueError('32-bit float pixels (mode F) have no fixed value range; '
                         'save the image as 8- or 16-bit')
    if image.mode in _SIXTEEN_BIT_MODES:
        return _from_sixteen_bit(image)
    if image.mode in _ALPHA_MODES or 'transparency' in image.info:
        return _composite(image, background)
    return image if image.mode == 'RGB' else image.convert('RGB')


def load_image(path: str | Path,
               background: tuple[int, int, int] = DEFAULT_BACKGROUND) -> Image.Image:
    """Decode ``path`` fully into an RGB image.

    CMYK, L, 1 and P become RGB; transparent images (RGBA, LA, P or L/RGB with a
    transparency key) are composited onto ``background``; 16-bit grayscale is scaled by
    1/257. Empty, truncated and non-image files, and float ('F') images, raise
    :class:`BadImageError` naming the file.
    """
    image = _open_loaded(path)
    try:
        return _to_rgb(image, background)
    except ValueError as err:  # an unsupported pixel format, or a failed mode conversion
        raise BadImageError(path, str(err)) from err


# ---------------------------------------------------------------------------- in memory


class _Decoder:
    """Decodes images one by one into a preallocated (N, 3, H, W) uint8 buffer."""

    def __init__(self, count: int, size: int | None, skip_bad: bool, max_bad: int,
                 background: tuple[int, int, int]) -> None:
        self.count, self.size, self.skip_bad, self.max_bad = count, size, skip_bad, max_bad
        self.background = background
        self.buffer: np.ndarray | None = None
        self.first: tuple[str, tuple[int, int]] | None = None
        self.kept = 0
        self.skipped: list[tuple[str, str]] = []

    def add(self, path: str) -> bool:
        """Decode ``path`` into the next slot; False if it was bad and skipped."""
        try:
            image = load_image(path, self.background)
        except BadImageError as err:
            if not self.skip_bad:
                raise
            self._skip(err)
            return False
        if self.size is not None and image.size != (self.size, self.size):
            image = image.resize((self.size, self.size), Image.Resampling.BICUBIC)
        self._slot(path, image.size)[...] = np.asarray(image).transpose(2, 0, 1)
        self.kept += 1
        return True

    def _skip(self, err: BadImageError) -> None:
        self.skipped.append((err.path, err.reason))
        if len(self.skipped) > self.max_bad:
            seen = self.kept + len(self.skipped)
            raise DataError(f'{len(self.skipped)} of the first {seen} image files are bad, more '
                            f'than max_bad={self.max_bad}; first: {_first_few(self.skipped)}')

    def _slot(self, path: str, size: tuple[int, int]) -> np.ndarray:
        if self.first is None:
            self.first = (path, size)
            self.buffer = np.empty((self.count, 3, size[1], size[0]), dtype=np.uint8)
        elif size != self.first[1]:
            raise DataError(f'{path}: image is {_wxh(size)} but {self.first[0]} is '
                            f'{_wxh(self.first[1])}; pass an image size to resize all images')
        assert self.buffer is not None
        return self.buffer[self.kept]

    def images(self) -> torch.Tensor:
        if self.buffer is None:
            raise DataError(f'none of the {self.count} image files could be decoded; '
                            f'first: {_first_few(self.skipped)}')
        return torch.from_numpy(self.buffer[:self.kept])


def _wxh(size: tuple[int, int]) -> str:
    return f'{size[0]}x{size[1]}'


def _first_few(skipped: list[tuple[str, str]], count: int = 3) -> str:
    return '; '.join(f'{path} ({reason})' for path, reason in skipped[:count])


def decode_to_memory(samples: Samples, size: int | None = None, skip_bad: bool = False,
                     max_bad: int = 100, background: tuple[int, int, int] = DEFAULT_BACKGROUND,
                     progress: bool = False) -> MemoryData:
    """Decode every file of ``samples`` into one contiguous (N, 3, H, W) uint8 tensor.

    With ``size`` None all images must share the first image's size; otherwise images are
    resized (bicubic) to ``size`` x ``size``. A bad file raises :class:`BadImageError`, or
    with ``skip_bad`` is left out and listed in ``skipped``; more than ``max_bad`` bad files,
    or no good one, raise :class:`DataError`.
    """
    if size is not None and size <= 0:
        raise ConfigError(f'image size must be positive, got {size}')
    if max_bad < 0:
        raise ConfigError(f'max_bad must be >= 0, got {max_bad}')
    if not samples.paths:
        raise DataError('no image files to decode')
    decoder = _Decoder(len(samples.paths), size, skip_bad, max_bad, background)
    labels: list[int] = []
    pairs = zip(samples.paths, samples.labels, strict=True)
    for path, label in tqdm(pairs, total=len(samples), desc='decoding images', unit='img',
                            disable=not progress):
        if decoder.add(path):
            labels.append(label)
    return MemoryData(decoder.images(), torch.tensor(labels, dtype=torch.int64),
                      list(samples.classes), decoder.skipped)


def load_digits_memory() -> MemoryData:
    """scikit-learn's bundled 8x8 digits (1797 images, no download) as 3-channel uint8."""
    from sklearn.datasets import load_digits  # slow to import; only this loader needs it

    digits = load_digits()
    gray = torch.from_numpy(digits.images.astype(np.int64) * 255 // 16).to(torch.uint8)
    images = gray.unsqueeze(1).expand(-1, 3, -1, -1).contiguous()
    labels = torch.from_numpy(digits.target.astype(np.int64))
    return MemoryData(images, labels, [str(d) for d in range(10)])


def load_torchvision_memory(name: str, root: str | Path, train: bool,
                            download: bool = True) -> MemoryData:
    """CIFAR-10/100 through torchvision (``name`` 'cifar10' or 'cifar100'), held in memory."""
    from torchvision import datasets

    classes = {'cifar10': datasets.CIFAR10, 'cifar100': datasets.CIFAR100}
    if name not in classes:
        raise ConfigError(f'unknown dataset {name!r}; choose one of {", ".join(classes)}')
    try:
        dataset = classes[name](root=str(root), train=train, download=download)
    except _FETCH_ERRORS as err:
        raise DataError(f'{name} could not be downloaded or read in {root}: {err}. Without '
                        'network access, pass --data PATH with a local image folder') from err
    images = torch.from_numpy(np.ascontiguousarray(dataset.data.transpose(0, 3, 1, 2)))
    return MemoryData(images, torch.tensor(dataset.targets, dtype=torch.int64),
                      list(dataset.classes))


# ---------------------------------------------------------------------------- streaming


class FileDataset(torch.utils.data.Dataset):
    """Streams ``samples`` from disk: item ``i`` is ``(transform(load_image(path)), label)``.

    With ``skip_bad`` a bad file is replaced by the next decodable sample (wrapping around)
    and its label, the swap is logged, and ``skipped`` counts the replacements made *in this
    process*: each DataLoader worker holds its own copy, so the main process sees 0 when
    ``num_workers > 0``. Without ``skip_bad`` a bad file raises :class:`BadImageError`.
    """

    def __init__(self, samples: Samples, transform: Callable[[Image.Image], Any] | None = None,
                 skip_bad: bool = False,
                 background: tuple[int, int, int] = DEFAULT_BACKGROUND) -> None:
        if not samples.paths:
            raise DataError('no image files in the dataset')
        self.samples = samples
        self.transform = transform
        self.skip_bad = skip_bad
        self.background = background
        self.skipped = 0

    def __len__(self) -> int:
        return len(self.samples.paths)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        for candidate in self._candidates(index):
            try:
                image = load_image(self.samples.paths[candidate], self.background)
            except BadImageError as err:
                if not self.skip_bad:
                    raise
                self.skipped += 1
                log.warning('skipping bad image %s: %s', err.path, err.reason)
                continue
            label = self.samples.labels[candidate]
            return (image if self.transform is None else self.transform(image)), label
        raise DataError(f'none of the {len(self)} image files could be decoded')

    def _candidates(self, index: int) -> Iterator[int]:
        """``index`` (IndexError if out of range), then the following indices, wrapping."""
        count = len(self)
        start = range(count)[index]
        return ((start + step) % count for step in range(count if self.skip_bad else 1))


# ---------------------------------------------------------------------------- splits


def _label_array(labels: Sequence[int] | torch.Tensor) -> np.ndarray:
    values = labels.tolist() if isinstance(labels, torch.Tensor) else list(labels)
    array = np.asarray(values, dtype=np.int64)
    if array.ndim != 1 or not array.size:
        raise DataError(f'need a non-empty 1-D list of labels, got shape {array.shape}')
    return array


def _class_members(labels: np.ndarray, seed: int) -> Iterator[np.ndarray]:
    """Per class (in label order), its indices shuffled by one generator seeded with ``seed``."""
    rng = np.random.default_rng(seed)
    for value in np.unique(labels):
        yield rng.permutation(np.flatnonzero(labels == value))


def _val_count(class_count: int, val_frac: float) -> int:
    """round(val_frac * n), but at least 1 and at most n - 1 when a class has n >= 2 items."""
    if class_count < 2:
        return 0
    return min(max(round(val_frac * class_count), 1), class_count - 1)


def stratified_split(labels: Sequence[int] | torch.Tensor, val_frac: float,
                     seed: int) -> tuple[list[int], list[int]]:
    """Seeded per-class split into sorted ``(train_indices, val_indices)``.

    Each class sends ``round(val_frac * n)`` of its ``n`` items to validation, clamped to
    1..n-1 so that every class appears in both parts; a single-item class stays in train.
    """
    if not 0 < val_frac < 1:
        raise ConfigError(f'val_frac must be between 0 and 1 (exclusive), got {val_frac}')
    train: list[int] = []
    val: list[int] = []
    for members in _class_members(_label_array(labels), seed):
        cut = _val_count(len(members), val_frac)
        val.extend(members[:cut].tolist())
        train.extend(members[cut:].tolist())
    return sorted(train), sorted(val)


def _quotas(counts: np.ndarray, n: int) -> list[int]:
    """Split ``n`` over classes in proportion to ``counts`` by largest remainders."""
    total = int(counts.sum())
    shares = [divmod(n * int(c), total) for c in counts]
    order = sorted(range(len(shares)), key=lambda k: (-shares[k][1], k))
    extra = set(order[:n - sum(whole for whole, _ in shares)])
    return [whole + (k in extra) for k, (whole, _) in enumerate(shares)]


def stratified_subset(labels: Sequence[int] | torch.Tensor, n: int, seed: int) -> list[int]:
    """``n`` sorted indices, seeded, with class proportions kept (largest-remainder rounding)."""
    array = _label_array(labels)
    if not 0 < n <= len(array):
        raise ConfigError(f'subset size must be between 1 and {len(array)}, got {n}')
    counts = np.unique(array, return_counts=True)[1]
    chosen: list[int] = []
    for members, quota in zip(_class_members(array, seed), _quotas(counts, n)):
        chosen.extend(members[:quota].tolist())
    return sorted(chosen)


def files_fingerprint(samples: Samples, root: str | Path) -> str:
    """sha256 of the (path relative to ``root``, size) list of ``samples``: a copy of the same image
    folder under another path has the same fingerprint (``root`` is the ``--data`` folder, so
    ``ds`` with ``ds/train/...`` and ``ds/train`` itself differ)."""
    h = hashlib.sha256()
    for p in samples.paths:
        h.update(f'{Path(os.path.relpath(p, root)).as_posix()}\t{os.path.getsize(p)}\n'.encode())
    return h.hexdigest()


def save_split(path: str | Path, train_idx: Sequence[int], val_idx: Sequence[int], *,
               seed: int, val_frac: float, num_samples: int, files: str | None = None) -> None:
    """Write a train/val index split as JSON, atomically (temp file + ``os.replace``).

    ``files``: :func:`files_fingerprint` of the images the indices point into, so that ``rowcol
    eval`` recognises the run's training data when it has moved.
    """
    record = {'seed': int(seed), 'val_frac': float(val_frac), 'num_samples': int(num_samples),
              'train': [int(i) for i in train_idx], 'val': [int(i) for i in val_idx]}
    if files:
        record['files'] = files

    def write(tmp: str) -> None:
        with open(tmp, 'w') as file:
            json.dump(record, file, separators=(',', ':'))
    atomic_write(path, write)


def _split_problem(record: Any) -> str | None:
    """What is wrong with a loaded split record, or None if it is valid."""
    if not isinstance(record, dict):
        return 'not a JSON object'
    missing = [key for key in SPLIT_KEYS if key not in record]
    if missing:
        return f'missing keys: {", ".join(missing)}'
    size = record['num_samples']
    if not isinstance(size, int) or size <= 0:
        return f'num_samples must be a positive integer, got {size!r}'
    if not isinstance(record['seed'], int):
        return f'seed must be an integer, got {record["seed"]!r}'
    if not isinstance(record['val_frac'], (int, float)) or not 0 < record['val_frac'] < 1:
        return f'val_frac must be a number between 0 and 1, got {record["val_frac"]!r}'
    for key in ('train', 'val'):
        ids = record[key]
        if not isinstance(ids, list) or not all(type(i) is int and 0 <= i < size for i in ids):
            return f'{key!r} must be a list of indices in 0..{size - 1}'
    if set(record['train']) & set(record['val']):
        return 'train and val indices overlap'
    return None


def load_split(path: str | Path) -> dict[str, Any]:
    """Read a split written by :func:`save_split`; DataError naming the file if it is broken."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f'{path}: cannot read split file: {err}') from err
    problem = _split_problem(record)
    if problem:
        raise DataError(f'{path}: broken split file: {problem}')
    return record
