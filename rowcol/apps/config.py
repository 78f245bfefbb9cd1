"""A training run as typed config: defaults, recipes, and strict merging of overrides.

``resolve_config(recipe, **overrides)`` starts from :class:`TrainConfig` defaults, applies a
recipe, then the user's values; an unknown key is a :class:`~rowcol.errors.ConfigError`
that names it. The resolved config is written to the run directory as ``config.json`` and
read back (again strictly) on ``--resume`` and by ``rowcol eval``.

Learning rate: ``lr`` when given, else ``base_lr * batch_size / lr_base_size`` (the linear
scaling rule of the DeiT and ResNet recipes), computed from the global batch size.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from rowcol.errors import ConfigError

__all__ = ['TrainConfig', 'DataConfig', 'RECIPES', 'FIELD_HELP', 'FIELD_TYPES', 'RESUMABLE', 'MODEL_KWARGS', 'NAMED',
           'check_model_kwargs', 'resolve_config', 'config_from_dict', 'absolute_path']

NAMED = ('digits', 'cifar10', 'cifar100')  # the datasets --data takes by name (no folder)

# The only keys --model-kwargs (a run's ``model_kwargs``) may hold. timm.create_model takes any
# keyword, among them checkpoint_path (torch.load of any file), pretrained, pretrained_cfg,
# pretrained_cfg_overlay, pretrained_strict and features_only: a config.json must not reach those.
# So: the arguments rowcol documents, plus timm options that only shape the network. The one list;
# TrainConfig.validate and checkpoint.load_run both check it.
MODEL_KWARGS = frozenset({
    # ViT-PE ablations (rowcol/models/vit.py, docs/MODELS.md)
    'attn_form', 'mlp_act', 'tie_mlp', 'use_scale',
    # ResNet and ResNet-PE (rowcol/models/resnet.py: ResNetPE.__init__)
    'layers', 'widths', 'pe_stages', 'tie', 'stem', 'zero_init_last',
    # ViT sizes (docs/RESULTS.md runs) and timm's VisionTransformer options that only shape it
    'embed_dim', 'num_heads', 'depth', 'mlp_ratio', 'patch_size', 'img_size', 'qkv_bias', 'qk_norm',
    'class_token', 'global_pool', 'fc_norm', 'no_embed_class', 'reg_tokens', 'init_values',
    'drop_rate', 'pos_drop_rate', 'proj_drop_rate', 'attn_drop_rate', 'dynamic_img_size',
    # sizes of the other timm families that --halve is documented for (docs/HALVE.md: PVT-v2, Swin,
    # ConvNeXt, MLP-Mixer, ResNet)
    'depths', 'dims', 'embed_dims', 'mlp_ratios', 'sr_ratios', 'window_size', 'num_blocks', 'ls_init_value',
    'base_width', 'stem_width', 'stem_type',
})


def check_model_kwargs(kwargs: Any, where: str = 'model_kwargs') -> None:
    """:class:`ConfigError` naming any key of ``kwargs`` that is not in :data:`MODEL_KWARGS`."""
    if not isinstance(kwargs, dict):
        raise ConfigError(f'{where} must be a JSON object, got {type(kwargs).__name__}')
    refused = sorted(k for k in kwargs if k not in MODEL_KWARGS)
    if refused:
        raise ConfigError(f"{where}: {', '.join(repr(k) for k in refused)} not accepted; rowcol passes only these "
                          f"model arguments: {', '.join(sorted(MODEL_KWARGS))}")


@dataclass
class TrainConfig:
    """One training run, every setting typed; the defaults are the ``cifar_vit`` recipe's.

    Resolved once (:func:`resolve_config`, :func:`config_from_dict`) and then not changed:
    whatever derives a new value (``rowcol train`` making data paths absolute, choosing
    channels_last) makes a new config with ``dataclasses.replace``.
    """
    # what to train, on what
    model: str = 'vit_pe_nano_patch4_32'
    data: str = 'digits'            # ImageFolder root, 'digits', 'cifar10' or 'cifar100'
    val_data: str | None = None     # a separate validation ImageFolder
    val_split: float | None = None  # fraction held out (stratified, seeded) when no val data
    split_seed: int = 0             # seed of that split: fixed, so runs of any --seed share it
    subset: int | None = None       # train on a stratified subset of this many images
    img_size: int | None = None     # default: the model's
    in_memory: bool | None = None   # decode once into RAM; default: images of <= 64 px
    skip_bad_images: bool = False
    max_bad_images: int = 100
    workers: int = 2                # DataLoader workers for streamed (not in-memory) data
    # recipe
    recipe: str = 'cifar_vit'
    epochs: int = 25
    batch_size: int = 128           # global, over all processes
    opt: str = 'adamw'
    lr: float | None = None
    base_lr: float = 1e-3
    lr_base_size: int = 512
    weight_decay: float = 0.05
    momentum: float = 0.9
    sched: str = 'cosine'
    warmup_epochs: float = 2
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5
    label_smoothing: float = 0.1
    mixup: float = 0.0
    cutmix: float = 0.0
    auto_augment: str | None = None  # timm string, e.g. 'rand-m9-mstd0.5'
    crop_padding: int = 4           # padded random crop (small images) / RandomResizedCrop (large)
    hflip: float = 0.5
    reprob: float = 0.0             # random erasing probability
    drop_path: float = 0.0
    ema_decay: float | None = None
    clip_grad: float | None = None
    # execution
    amp: str = 'none'               # none | bf16 | fp16 (CUDA only)
    channels_last: bool | None = None  # default: on for CNNs
    compile: bool = False
    grad_checkpointing: bool = False
    device: str | None = None       # default: cuda if available
    seed: int = 0
    max_nonfinite: int = 5          # this many non-finite losses in a row abort the run
    save_every_steps: int = 0       # also checkpoint every N steps (0: once per epoch)
    max_steps: int | None = None    # stop (with a resumable checkpoint) after this many steps; 0: no limit
    log: str = 'none'               # none | tensorboard (event files beside metrics.jsonl, the same scalars)
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    # halving and distillation
    halve: bool = False             # tie the model's layer pairs with rowcol.halve
    halve_attn: str = 'qo_kv'       # attention form for --halve: qo_kv | qk_vo | vo | dense
    halve_scale: bool = False       # per-use channel scales in the halved MLPs and attentions
    init_from: str | None = None    # a trained dense run: its weights, halved with init='dense'
    teacher: str | None = None      # a trained run: soft-target knowledge distillation from it
    distill_alpha: float = 0.5      # loss = (1 - a) CE + a tau^2 KL (DeiT's soft distillation)
    distill_tau: float = 1.0

    def scaled_lr(self) -> float:
        return self.lr if self.lr is not None else self.base_lr * self.batch_size / self.lr_base_size

    def data_config(self) -> DataConfig:
        """The part of this config that the data pipeline reads."""
        return DataConfig.from_train(self)

    def with_absolute_paths(self) -> TrainConfig:
        """A copy whose data and run paths are absolute, so eval can tell a run's own data from any cwd."""
        return dataclasses.replace(self, data=absolute_path(self.data), val_data=absolute_path(self.val_data),
                                   init_from=absolute_path(self.init_from), teacher=absolute_path(self.teacher))

    def validate(self) -> TrainConfig:
        """``self`` if every value has its field's type and range, else :class:`ConfigError`."""
        check_types(dataclasses.asdict(self))
        checks = [
            (self.epochs >= 1, 'epochs must be >= 1'),
            (self.batch_size >= 1, 'batch_size must be >= 1'),
            (self.val_split is None or 0 < self.val_split < 1, 'val_split must be in (0, 1)'),
            (self.subset is None or self.subset > 0, 'subset must be > 0'),
            (self.amp in ('none', 'bf16', 'fp16'), f"amp must be none, bf16 or fp16, got '{self.amp}'"),
            (self.recipe in RECIPES, f"unknown recipe '{self.recipe}', expected one of {sorted(RECIPES)}"),
            (self.max_nonfinite >= 1, 'max_nonfinite must be >= 1'),
            (0 <= self.hflip <= 1 and 0 <= self.reprob <= 1, 'hflip and reprob are probabilities'),
            (0 <= self.label_smoothing < 1, 'label_smoothing must be in [0, 1)'),
            (self.mixup >= 0 and self.cutmix >= 0, 'mixup and cutmix must be >= 0'),
            (self.ema_decay is None or 0 < self.ema_decay < 1, 'ema_decay must be in (0, 1)'),
            ((self.lr is None or self.lr > 0) and self.base_lr > 0, 'lr and base_lr must be > 0'),
            (self.lr_base_size > 0, 'lr_base_size must be > 0'),
            (self.img_size is None or self.img_size > 0, 'img_size must be > 0'),
            (self.crop_padding >= 0 and self.workers >= 0, 'crop_padding and workers must be >= 0'),
            (self.max_steps is None or self.max_steps >= 0, 'max_steps must be >= 0 (0: no limit)'),
            (self.save_every_steps >= 0, 'save_every_steps must be >= 0'),
            (self.warmup_epochs >= 0 and self.weight_decay >= 0, 'warmup_epochs and weight_decay must be >= 0'),
            (self.log in ('none', 'tensorboard'), f"log must be none or tensorboard, got '{self.log}'"),
            (self.halve_attn in ('qo_kv', 'qk_vo', 'vo', 'dense'),
             f"halve_attn must be qo_kv, qk_vo, vo or dense, got '{self.halve_attn}'"),
            (self.halve or not (self.halve_scale or self.init_from), '--halve-scale and --init-from need --halve'),
            (0 <= self.distill_alpha <= 1 and self.distill_tau > 0, 'distill_alpha must be in [0, 1], distill_tau > 0'),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)
        check_model_kwargs(self.model_kwargs, '--model-kwargs')
        return self


FIELD_HELP = {
    'model': 'timm model name, e.g. vit_pe_nano_patch4_32 (rowcol params lists the PE models)',
    'data': "ImageFolder root (class folders, or train/ and val/ inside), or 'digits', 'cifar10', 'cifar100'",
    'val_data': 'a separate validation ImageFolder',
    'val_split': 'hold out this fraction of --data for validation (stratified, seeded, saved as split.json)',
    'split_seed': 'seed of the --val-split split (default 0 for every run, so all runs share one split)',
    'subset': 'train on a stratified subset of N images',
    'img_size': "input size (default: the model's)",
    'in_memory': 'decode the dataset once into RAM (default: when images are <= 64 px)',
    'skip_bad_images': 'skip unreadable image files instead of stopping (in-memory data: listed in '
                       'skipped_images.json; streamed data: each skip is logged as a warning)',
    'max_bad_images': 'with --skip-bad-images on in-memory data, stop if more files than this are bad',
    'workers': 'DataLoader workers for streamed data',
    'recipe': 'deit | resnet | cifar_vit | cifar_resnet | digits (rowcol/apps/config.py documents each)',
    'epochs': 'epochs to train', 'batch_size': 'global batch size (over all processes)',
    'opt': 'timm optimizer name (adamw, nesterov, sgd, ...)',
    'lr': 'learning rate (default: base_lr x batch_size / lr_base_size)',
    'base_lr': 'learning rate at lr_base_size', 'lr_base_size': 'batch size that base_lr is for',
    'weight_decay': 'weight decay (never on norms, biases, embeddings)', 'momentum': 'SGD momentum',
    'sched': 'timm scheduler name', 'warmup_epochs': 'linear warm-up epochs', 'warmup_lr': 'warm-up start lr',
    'min_lr': 'final lr of the schedule', 'label_smoothing': 'label smoothing',
    'mixup': 'Mixup alpha (0: off)', 'cutmix': 'CutMix alpha (0: off)',
    'auto_augment': "timm auto-augment string, e.g. 'rand-m9-mstd0.5'",
    'crop_padding': 'padding of the random crop of small images', 'hflip': 'horizontal flip probability',
    'reprob': 'random erasing probability', 'drop_path': 'stochastic depth rate',
    'ema_decay': 'keep an EMA of the weights with this decay (e.g. 0.9998)',
    'clip_grad': 'clip the gradient norm to this value',
    'amp': 'none | bf16 (CPU and GPU) | fp16 (GPU, with GradScaler)',
    'channels_last': 'channels_last memory format (default: on for CNNs)', 'compile': 'torch.compile the model',
    'grad_checkpointing': 'non-reentrant activation checkpointing', 'device': 'cpu | cuda (default: cuda if present)',
    'seed': 'seed of the run (init, data order, augmentation, --subset); the split has --split-seed',
    'max_nonfinite': 'abort after this many non-finite losses in a row',
    'save_every_steps': 'also write a resumable checkpoint every N steps (at the next step, once its loss is finite)',
    'max_steps': 'stop after N steps in total, with a resumable checkpoint (0: no limit, e.g. to finish a stopped run)',
    'model_kwargs': 'extra model arguments as JSON, e.g. \'{"attn_form": "vo"}\' (only those in '
                    'rowcol.apps.config.MODEL_KWARGS)',
    'log': 'tensorboard: also write TensorBoard event files with the epoch scalars into the run directory '
           '(needs pip install tensorboard)',
    'halve': 'tie the layer pairs of --model (any timm model) with rowcol.halve',
    'halve_attn': 'attention form for --halve: qo_kv (the authors\'), qk_vo, vo, or dense (untied)',
    'halve_scale': 'per-use channel scales in the halved MLPs and attentions',
    'init_from': 'start from a trained dense run (RUN_DIR), halved with init=dense (implies --halve)',
    'teacher': 'distil from a trained run (RUN_DIR): soft targets, teacher frozen in eval mode',
    'distill_alpha': 'weight of the distillation term: (1 - a) CE + a tau^2 KL (default 0.5)',
    'distill_tau': 'distillation temperature (default 1)',
}
# What --resume may change; anything else would make the continued run a different run.
RESUMABLE = frozenset({'epochs', 'max_steps', 'save_every_steps', 'workers', 'device', 'max_nonfinite', 'log'})


def deit() -> dict:
    """DeiT (Touvron et al. 2021) for ImageNet-sized ViTs.

    ``rowcol train --recipe deit --model vit_pe_small_patch16_224 --data IMAGENET --epochs 300``;
    needs GPUs (timm reports 79.9% top-1 for the dense ViT-S/16 with this recipe; rowcol has not
    run it).
    """
    return dict(opt='adamw', base_lr=5e-4, lr_base_size=512, weight_decay=0.05, sched='cosine',
                warmup_epochs=5, label_smoothing=0.1, mixup=0.8, cutmix=1.0,
                auto_augment='rand-m9-mstd0.5-inc1', reprob=0.25, drop_path=0.1, epochs=300,
                batch_size=1024)


def resnet() -> dict:
    """ResNet (Goyal et al. 2017 linear scaling): SGD+nesterov, lr 0.1 x bs/256, wd 1e-4 (none on
    norms and biases), cosine with warm-up, label smoothing 0.1.

    ``rowcol train --recipe resnet --model resnet50_pe --data IMAGENET --epochs 90``; needs GPUs,
    not run by rowcol yet.
    """
    return dict(opt='nesterov', base_lr=0.1, lr_base_size=256, weight_decay=1e-4, momentum=0.9,
                sched='cosine', warmup_epochs=5, label_smoothing=0.1, epochs=90, batch_size=256)


def cifar_vit() -> dict:
    """CPU-sized ViT on 32-px CIFAR: AdamW lr 1e-3 x bs/512, padded crop + flip, label smoothing.

    ``rowcol train --recipe cifar_vit --model vit_pe_nano_patch4_32 --data ../shared/data/cifar10/train
    --val-split 0.1 --epochs 25``; about 3.5 minutes per epoch on 2 cores (fp32). 25 epochs:
    69.45 ± 0.69% validation top-1 for the dense vit_nano_patch4_32, 62.82 ± 0.71% for the PE twin
    (seeds 0, 1; docs/RESULTS.md).
    """
    return dict(opt='adamw', base_lr=1e-3, lr_base_size=512, weight_decay=0.05, sched='cosine',
                warmup_epochs=2, label_smoothing=0.1, crop_padding=4, hflip=0.5, epochs=25,
                batch_size=128)


def cifar_resnet() -> dict:
    """CPU-sized bottleneck ResNet on 32-px CIFAR: SGD+nesterov lr 0.2 x bs/256, wd 5e-4.

    ``rowcol train --recipe cifar_resnet --model resnet26_pe_cifar --data ../shared/data/cifar10/train
    --val-split 0.1 --amp bf16 --epochs 30``: 60 minutes on 2 cores; 85.89 ± 0.16% validation
    top-1 for the dense resnet26_cifar, 87.04 ± 0.17% for resnet26_pe_cifar (seeds 0, 1;
    docs/RESULTS.md).
    """
    return dict(opt='nesterov', base_lr=0.2, lr_base_size=256, weight_decay=5e-4, momentum=0.9,
                sched='cosine', warmup_epochs=1, label_smoothing=0.1, crop_padding=4, hflip=0.5,
                epochs=30, batch_size=128)


def digits() -> dict:
    """scikit-learn's bundled 8x8 digits upsampled to 16 px, for the demo (no files needed).

    ``rowcol demo`` trains ``vit_micro_patch4_16`` and ``vit_pe_micro_patch4_16`` with it.
    No flips (digits are not mirror-symmetric), 1-px padded crops.
    """
    return dict(data='digits', opt='adamw', base_lr=2e-3, lr_base_size=32, weight_decay=0.05,
                sched='cosine', warmup_epochs=1, label_smoothing=0.1, crop_padding=1, hflip=0.0,
                epochs=30, batch_size=32, val_split=0.2)


RECIPES: dict[str, Callable[[], dict]] = {
    'deit': deit, 'resnet': resnet, 'cifar_vit': cifar_vit, 'cifar_resnet': cifar_resnet, 'digits': digits,
}
_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}


def _field_type(hint: Any) -> tuple[type, bool]:
    """``(base type, None allowed)`` of a field annotation: ``int``, ``float | None``, ``dict[str, Any]``."""
    optional = typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint)
    if optional:
        (hint,) = [a for a in typing.get_args(hint) if a is not type(None)]
    return (typing.get_origin(hint) or hint), optional


# Every field's type, as (base type, None allowed): what config values are checked against, and
# what the command line's flags convert to.
FIELD_TYPES: dict[str, tuple[type, bool]] = {
    name: _field_type(hint) for name, hint in typing.get_type_hints(TrainConfig).items() if name in _FIELDS}


def _has_type(value: Any, base: type) -> bool:
    if base is float:  # an int is a float (JSON writes 2.0 as 2); a bool is not a number here
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if base is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, base)


def _type_name(name: str) -> str:
    base, optional = FIELD_TYPES[name]
    return base.__name__ + (' or None' if optional else '')


def check_types(values: dict, where: str = 'config') -> None:
    """:class:`ConfigError` naming every key of ``values`` whose value has not its field's type
    (int, float (an int too), bool (only True or False), str, dict; None where the field allows it)."""
    wrong = [f'{k} must be {_type_name(k)}, got {type(v).__name__} {v!r}' for k, v in values.items()
             if k in FIELD_TYPES and not (v is None and FIELD_TYPES[k][1]) and not _has_type(v, FIELD_TYPES[k][0])]
    if wrong:
        raise ConfigError(f"{where}: wrong type: {'; '.join(wrong)}")


def _check_keys(d: dict, where: str) -> None:
    unknown = sorted(set(d) - _FIELDS)
    if unknown:
        hints = [f"{k} (did you mean {m[0]}?)" if (m := difflib.get_close_matches(k, _FIELDS, n=1)) else k
                 for k in unknown]
        raise ConfigError(f"{where}: unknown config key(s): {', '.join(hints)}")


def resolve_config(recipe: str | None = None, **overrides: Any) -> TrainConfig:
    """Defaults, then the recipe, then ``overrides`` (``None`` values mean "not given")."""
    overrides = {k: v for k, v in overrides.items() if v is not None}
    _check_keys(overrides, 'overrides')
    check_types(overrides, 'overrides')
    recipe = recipe or TrainConfig.recipe
    if recipe not in RECIPES:
        raise ConfigError(f"unknown recipe '{recipe}', expected one of {sorted(RECIPES)}")
    values = {**RECIPES[recipe](), **overrides, 'recipe': recipe}
    return TrainConfig(**values).validate()


def config_from_dict(d: dict, where: str = 'config') -> TrainConfig:
    """A config read back from JSON; keys written by rowcol besides the config are ignored."""
    written = ('classes', 'num_classes', 'rowcol_version', 'world_size', 'device_used')
    d = {k: v for k, v in d.items() if k not in written}
    _check_keys(d, where)
    check_types(d, where)
    return TrainConfig(**d).validate()


def absolute_path(path: str | None) -> str | None:
    """``path`` made absolute (user and links resolved); None and the names in :data:`NAMED` as they are."""
    return path if path is None or path in NAMED else str(Path(path).expanduser().resolve())


@dataclass(frozen=True)
class DataConfig:
    """What the data pipeline (:mod:`rowcol.apps.pipeline`) reads: the data, its split and subset, how it is
    decoded and batched, and its augmentation. Defaults as :class:`TrainConfig`'s."""
    data: str = 'digits'                # ImageFolder root, or one of NAMED
    val_data: str | None = None         # a separate validation ImageFolder
    val_split: float | None = None      # fraction of data held out for validation
    split_seed: int = 0
    subset: int | None = None           # train on a stratified subset of this many images
    in_memory: bool | None = None       # decode once into RAM; default: images of <= 64 px
    skip_bad_images: bool = False
    max_bad_images: int = 100
    workers: int = 2                    # DataLoader workers for streamed data
    batch_size: int = 128               # global, over all processes
    seed: int = 0                       # data order, augmentation draws, --subset
    crop_padding: int = 4
    hflip: float = 0.5
    auto_augment: str | None = None
    reprob: float = 0.0                 # random erasing (in the transform of streamed data)

    @classmethod
    def from_train(cls, cfg: Any) -> DataConfig:
        """The data part of ``cfg``: a :class:`TrainConfig`, or anything with these fields."""
        return cfg if isinstance(cfg, cls) else cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls)})
