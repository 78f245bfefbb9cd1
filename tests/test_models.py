"""Registry-wide model tests: shapes, gradients, exact counts, MACs, safetensors, timm interface."""
import copy

import pytest
import timm
import torch
from safetensors.torch import save_model
import torch.nn as nn

import rowcol
from rowcol.apps.checkpoint import load_weights, save_weights
from rowcol.errors import CheckpointError, ModelNameError
from rowcol.layers import TiedLinear, tied_modules
from rowcol.models import create_model, dense_twin, pe_models, pe_spec
from rowcol.stats import count_macs, count_params

PE = pe_models()
ROWCOL_MODELS = sorted(set(PE) | {dense_twin(n) for n in PE if timm.get_pretrained_cfg(dense_twin(n))
                                  and timm.get_pretrained_cfg(dense_twin(n)).input_size[-1] <= 32}
                       | {'resnet50_pe_untied', 'resnet26_pe_cifar_untied'})
SMALL = {'resnet': 64, 'patch16': 32}  # test-time image sizes for the ImageNet-sized models


def _small(name):
    """Model and input for a fast CPU test: ImageNet models at a small resolution."""
    kwargs = {'num_classes': 7}
    size = timm.get_pretrained_cfg(name).input_size[-1]
    if 'patch16' in name:
        size = kwargs['img_size'] = 32
    elif 'resnet50' in name:
        size = 64
    return create_model(name, **kwargs), torch.randn(2, 3, size, size)


@pytest.mark.parametrize('name', ROWCOL_MODELS)
def test_fx_trace_and_torch_export_equal_eager(name):
    from torch.fx import symbolic_trace
    model, x = _small(name)
    model.eval()
    with torch.no_grad():
        want = model(x)
        torch.testing.assert_close(symbolic_trace(model)(x), want, rtol=0, atol=0)
        if name in ('vit_pe_micro_patch4_16', 'resnet26_pe_cifar', 'resnet50_pe'):  # each family, the slow part
            torch.testing.assert_close(torch.export.export(model, (x,)).module()(x), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('name', ROWCOL_MODELS)
def test_timm_feature_interface(name):
    """What timm checks of its own models: features_only (default, getter, fx) with feature_info's channels
    and reductions, forward_intermediates, prune_intermediate_layers, global_pool='' and reset_classifier."""
    model, x = _small(name)
    model.eval()
    size_kw = {'img_size': x.shape[-1]} if hasattr(model, 'patch_embed') else {}
    with torch.no_grad():
        for cls in (None, 'getter', 'fx'):
            kw = dict(size_kw, **({'feature_cls': cls} if cls else {}))
            fm = timm.create_model(name, features_only=True, **kw).eval()
            outs = fm(x)
            assert len(outs) == len(fm.feature_info.channels()) >= 1, (name, cls)
            for o, c, r in zip(outs, fm.feature_info.channels(), fm.feature_info.reduction()):
                if o.dim() == 3:  # a ViT's FX features are its blocks' tokens, (B, N, C), as in timm
                    assert o.shape[-1] == c and o.shape[1] >= (x.shape[-1] // r) ** 2, (name, cls, o.shape)
                else:
                    assert o.shape[1] == c and x.shape[-1] // o.shape[-1] == r, (name, cls, o.shape, c, r)
        final, inter = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x))
        assert len(inter) == len(model.feature_info)
        model.reset_classifier(0, '')
        assert model(x).shape == model.forward_features(x).shape  # no pooling, no head
        pooled = create_model(name, num_classes=0, global_pool='', **size_kw).eval()
        assert pooled(x).shape == final.shape
        kept = pooled.prune_intermediate_layers(indices=[1])
        assert kept == [1] and len(pooled.forward_intermediates(x, indices=[1], intermediates_only=True)) == 1


@pytest.mark.parametrize('name', ['resnet50_pe', 'vit_pe_small_patch16_224'])
def test_builds_on_the_meta_device(name):
    with torch.device('meta'):
        model = create_model(name)
    assert all(p.device.type == 'meta' for p in model.parameters())
    assert count_params(model) == pe_spec(name).params


def test_registry_lists_pe_models():
    listed = set(timm.list_models('*_pe*'))
    assert set(PE) <= listed
    assert {'vit_pe_tiny_patch16_224', 'vit_pe_small_patch16_224', 'vit_pe_base_patch16_224',
            'resnet50_pe', 'vit_pe_tiny_patch4_32'} <= set(PE)
    for name in PE:
        assert timm.is_model(dense_twin(name)), name


@pytest.mark.parametrize('name', ROWCOL_MODELS)
def test_forward_backward(name):
    model, x = _small(name)
    model.train()
    out = model(x)
    assert out.shape == (2, 7) and torch.isfinite(out).all()
    # zero-init last BNs starve W of gradient on the first step: perturb them, then check every grad
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.add_(0.1)
    model(x).logsumexp(-1).sum().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad, f'parameters without gradient: {no_grad[:5]}'


@pytest.mark.parametrize('name', PE)
def test_exact_counts_and_twin(name):
    spec = pe_spec(name)
    model = create_model(name)
    assert model.dense_twin == spec.dense
    assert count_params(model) == spec.params
    assert count_params(create_model(name, num_classes=0)) == spec.params_headless
    assert count_params(create_model(spec.dense)) == spec.dense_params
    # the dedup count equals the state_dict count: no weight is registered under two names
    assert sum(t.numel() for k, t in model.state_dict().items() if 'running' not in k
               and 'num_batches' not in k) == spec.params


def test_exact_parameter_counts_pe_and_dense():
    expected = {'vit_pe_tiny_patch16_224': (3_063_208, 5_717_416),
                'vit_pe_small_patch16_224': (11_433_832, 22_050_664),
                'vit_pe_base_patch16_224': (44_100_328, 86_567_656),
                'resnet50_pe': (15_515_176, 25_557_032)}
    for name, (pe, dense) in expected.items():
        assert count_params(create_model(name)) == pe
        assert count_params(timm.create_model(dense_twin(name))) == dense
    assert count_params(create_model('resnet50_pe', num_classes=0)) == 13_466_176


@pytest.mark.parametrize('name', [n for n in PE if 'patch16' not in n])
def test_macs_equal_the_dense_twin(name):
    pe, dense = create_model(name), create_model(dense_twin(name))
    if name.startswith('vit'):
        assert count_macs(pe) == count_macs(dense)
    else:  # ResNet-PE: widening/depthwise convs replace the projection shortcuts (+0.2% at ResNet-50)
        assert abs(count_macs(pe) / count_macs(dense) - 1) < 0.05


@pytest.mark.parametrize('name,untied_params', [('resnet50_pe', 23_641_640), ('resnet26_pe_cifar', 772_186)])
def test_resnet_pe_macs_equal_its_untied_layout(name, untied_params):
    """The untied layout (the speed and accuracy control of the tie) does the same MACs with the
    tied W's weights twice over (W1 and W2 per block of the PE stages) and knows no dense twin."""
    untied = create_model(f'{name}_untied')
    assert count_macs(create_model(name)) == count_macs(untied)
    assert count_params(untied) == untied_params and untied.dense_twin is None
    assert {type(m).__name__ for m in untied.modules()} >= {'PeStage', 'PeBottleneck'}
    assert all(blk.conv1.weight.shape[:2] == blk.conv3.weight.shape[1::-1] for stage in (untied.layer3, untied.layer4)
               for blk in stage.blocks)


def test_vit_pe_macs_equal_timms_dense_vit():
    assert count_macs(create_model('vit_pe_tiny_patch16_224')) == count_macs(timm.create_model('vit_tiny_patch16_224'))


def test_resnet_pe_stage_layout():
    model = create_model('resnet50_pe')
    for i, (m, c, n) in {3: (256, 1024, 6), 4: (512, 2048, 3)}.items():
        stage = getattr(model, f'layer{i}')
        assert stage.w.weight.shape == (m, c)  # one W per stage
        assert len(stage.blocks) == n
        assert not any(isinstance(mod, (TiedLinear, nn.Conv2d)) and mod.weight.shape[:2] in ((m, c), (c, m))
                       for blk in stage.blocks for mod in blk.modules())  # no per-block W, no fc2
    assert [n for n, _ in tied_modules(model)] == ['layer3.w', 'layer4.w']
    block = create_model('resnet50_pe', tie='block')
    assert len(tied_modules(block)) == 6 + 3
    with pytest.raises(ValueError, match='tie mode'):
        create_model('resnet50_pe', tie='layer')


@pytest.mark.parametrize('channels_last', [False, True])
def test_resnet_pe_block_formula(channels_last):
    """x1 = ReLU(BN(Wᵀ G(W x)) + identity) with hand-made convs and a transposed copy of W, the
    widened input [new, x] written out (the stage itself maps its two parts separately)."""
    model = create_model('resnet26_pe_cifar').eval()
    stage = model.layer3
    with torch.no_grad():
        for m in stage.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5), m.bias.normal_(), m.running_mean.normal_()
    x = torch.randn(2, 128, 8, 8)
    if channels_last:
        stage, x = stage.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    widened = torch.cat([stage.widen(x), x], 1)
    W = stage.w.weight.detach()
    blk = stage.blocks[0]
    h = torch.relu(blk.bn1(nn.functional.conv2d(widened, W[:, :, None, None])))
    h = torch.relu(blk.bn2(blk.conv2(h)))
    h = blk.bn3(nn.functional.conv2d(h, W.t().contiguous()[:, :, None, None]))
    expected0 = torch.relu(h + stage.downsample(widened))
    torch.testing.assert_close(blk(widened, stage.w, stage.downsample(widened)), expected0)
    with torch.no_grad():
        full = stage(x)
        y = expected0
        for b in stage.blocks[1:]:
            y = b(y, stage.w)
    torch.testing.assert_close(full, y)


def test_resnet_pe_stage_entry_conv_precision_under_cpu_bf16():
    """Under CPU bf16 autocast the strided depthwise conv at a PE stage's entry runs in fp32, forward
    and backward, when a backward may follow (oneDNN's bf16 input gradient of it is slow) and in
    bf16 without grad."""
    from torch.utils._python_dispatch import TorchDispatchMode
    ops = []

    class Convs(TorchDispatchMode):  # (op, dtype) of every strided grouped convolution and its gradients
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten.convolution.default, torch.ops.aten.convolution_backward.default):
                fwd = func is torch.ops.aten.convolution.default
                stride, groups = (args[3], args[8]) if fwd else (args[4], args[9])
                if tuple(stride) == (2, 2) and groups > 1:
                    ops.append((func.__name__, args[0].dtype))
            return func(*args, **(kwargs or {}))
    stage = create_model('resnet26_pe_cifar').layer3
    x = torch.randn(2, 128, 8, 8)
    with torch.autocast('cpu', torch.bfloat16), Convs():
        stage(x).float().sum().backward()  # the forward, the entry's recomputation and the backward
        assert {dt for _, dt in ops} == {torch.float32}
        assert {op for op, _ in ops} == {'convolution.default', 'convolution_backward.default'}
        ops.clear()
        with torch.no_grad():  # (inference_mode's ops do not reach a dispatch mode)
            stage(x)
    assert {dt for _, dt in ops} == {torch.bfloat16} and len(ops) == 2  # one per part
    assert stage.downsample[0].weight.grad is not None


@pytest.mark.parametrize('size', [16, 15])
def test_upcast_depthwise_gradients_equal_autograd_of_the_fp32_conv(size):
    """The fp32-in-bf16-out depthwise conv's own backward (weight gradient by batch quarters, input
    gradient as a transposed conv) equals autograd's gradients of the plain fp32 conv."""
    from rowcol.models.resnet import _UpcastDepthwise
    torch.manual_seed(0)
    x = torch.randn(6, 8, size, size).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    w = torch.randn(8, 1, 3, 3)
    g = torch.randn(6, 8, (size + 1) // 2, (size + 1) // 2).to(torch.bfloat16)
    a, wa = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = _UpcastDepthwise.apply(a, wa, (2, 2), (1, 1))
    y.backward(g)
    b, wb = x.clone().requires_grad_(), w.clone().requires_grad_()
    ref = nn.functional.conv2d(b.float(), wb, None, 2, 1, 1, 8).to(torch.bfloat16)
    ref.backward(g)
    assert y.dtype == a.grad.dtype == torch.bfloat16 and wa.grad.dtype == torch.float32
    torch.testing.assert_close(y, ref, rtol=0, atol=0)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-2, atol=1e-2)  # bf16 rounding of fp32 results
    torch.testing.assert_close(wa.grad, wb.grad, rtol=1e-5, atol=1e-4)


def _train_step(model, x):
    model.zero_grad()
    x = x.clone().requires_grad_(True)
    y = model(x)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    return y.detach(), x.grad, {n: p.grad.clone() for n, p in model.named_parameters()}, \
        {n: b.clone() for n, b in model.named_buffers()}


@pytest.mark.parametrize('name,kwargs', [('resnet26_pe_cifar', {}), ('resnet26_pe_cifar', {'tie': 'none'}),
                                         ('resnet26_pe_cifar', {'tie': 'block'}), ('resnet26_pe_all_cifar', {})])
@pytest.mark.parametrize('channels_last', [False, True])
def test_resnet_pe_recomputed_stage_entry_equals_the_plain_path(name, kwargs, channels_last):
    """Training with the stage entry recomputed in backward gives the plain path's outputs, gradients
    and BatchNorm running statistics (fp32, 1e-5), and never holds the widened tensor."""
    from rowcol.models.resnet import PeStage
    torch.manual_seed(0)
    model = create_model(name, **kwargs).train()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5), m.bias.normal_()
    plain = copy.deepcopy(model)
    x = torch.randn(4, 3, 32, 32)
    if channels_last:
        model, plain = model.to(memory_format=torch.channels_last), plain.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    assert PeStage.recompute_entry
    got = _train_step(model, x)
    PeStage.recompute_entry = False
    try:
        want = _train_step(plain, x)
    finally:
        PeStage.recompute_entry = True
    for a, b in zip(got[:2], want[:2]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for part in (2, 3):
        assert got[part].keys() == want[part].keys()
        for key in got[part]:
            torch.testing.assert_close(got[part][key], want[part][key], rtol=1e-5, atol=1e-5, msg=key)
    assert int(model.layer3.downsample[1].num_batches_tracked) == 1  # moved once, not again in the recomputation


def _entry_grads(stage, x, recompute: bool, params=None, before_backward=None):
    """Parameter gradients (by name) of one training step of a PE stage, recomputed entry on or off."""
    from torch.func import functional_call
    from rowcol.models.resnet import PeStage
    PeStage.recompute_entry = recompute
    try:
        assert (stage._recomputed_slots() is not None) == recompute
        y = stage(x) if params is None else functional_call(stage, params, (x,))
        if before_backward is not None:
            before_backward()
        y.square().sum().backward()
    finally:
        PeStage.recompute_entry = True
    return {n: p.grad for n, p in (params or dict(stage.named_parameters())).items()}


def test_resnet_pe_recomputed_entry_gives_the_plain_gradients_of_frozen_swapped_and_hooked_parameters():
    """The recomputed entry differentiates exactly the tensors the forward read: frozen parameters get
    no gradient, an input without grad is fine, parameters swapped in by torch.func.functional_call
    get theirs, a hook on a parameter runs once, a replaced conv1 with a bias gets its bias gradient,
    and a weight changed in place before backward is an error, as on the plain path (float64, 1e-10)."""
    torch.manual_seed(0)
    stage = create_model('resnet26_pe_cifar').layer3.train().double()
    plain = copy.deepcopy(stage)
    for s in (stage, plain):
        s.widen[1].weight.requires_grad_(False)  # a frozen part of the entry
        s.widen[0].weight.register_hook(lambda g: g * 0.5)  # a hook on a parameter (not on a module)
    x = torch.randn(2, 128, 16, 16, dtype=torch.float64)  # an input that needs no gradient
    got, want = _entry_grads(stage, x, True), _entry_grads(plain, x, False)
    for n in want:
        assert (got[n] is None) == (want[n] is None) == (n == 'widen.1.weight'), n
        if want[n] is not None:
            torch.testing.assert_close(got[n], want[n], rtol=1e-10, atol=1e-10, msg=n)
    swapped = {n: p.detach() * 1.5 for n, p in stage.named_parameters()}
    for t in swapped.values():
        t.requires_grad_()
    got = _entry_grads(stage, x, True, {n: t for n, t in swapped.items()})
    want = _entry_grads(plain, x, False, {n: t.detach().clone().requires_grad_() for n, t in swapped.items()})
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-10, atol=1e-10, msg=n)
    with pytest.raises(RuntimeError, match='modified by an inplace operation'):
        _entry_grads(stage, x, True, before_backward=lambda: stage.widen[0].weight.detach().add_(0))

    stage = create_model('resnet26_pe_cifar', tie='none').layer3.train().double()
    stage.blocks[0].conv1 = nn.Conv2d(256, 64, 1, bias=True).double()  # not a plain bias-free conv
    plain = copy.deepcopy(stage)
    got, want = _entry_grads(stage, x, True), _entry_grads(plain, x, False)
    assert want['blocks.0.conv1.bias'] is not None
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-10, atol=1e-10, msg=n)


def test_resnet_pe_entry_with_a_hooked_module_is_not_recomputed():
    """A hook on any module of the stage entry (forward, pre-forward, backward) makes the stage take
    the plain path, where the hook runs once per step and as registered."""
    for name in ('widen.0', 'widen.1', 'downsample.0', 'downsample.2', 'w'):
        stage = create_model('resnet26_pe_cifar').layer3.train()
        calls = []
        stage.get_submodule(name).register_forward_hook(lambda mod, inp, out: calls.append(1))
        assert stage._recomputed_slots() is None, name
        stage(torch.randn(2, 128, 16, 16)).sum().backward()
        assert calls == ([] if name == 'w' else [1]), name  # the tied W is read, its module never called
    stage = create_model('resnet26_pe_cifar').layer3.train()
    stage.downsample[1].register_full_backward_hook(lambda mod, gi, go: None)
    assert stage._recomputed_slots() is None
    assert create_model('resnet26_pe_cifar').layer3.train()._recomputed_slots() is not None


def test_resnet_pe_recomputed_entry_has_second_derivatives():
    """A double backward (e.g. a gradient penalty) goes through the recomputed entry: gradgradcheck
    on a small strided, widening PE stage in float64."""
    from rowcol.models.resnet import PeStage
    torch.manual_seed(0)
    stage = PeStage(4, 2, 1, 2).double().train()
    x = torch.randn(2, 4, 4, 4, dtype=torch.float64, requires_grad=True)
    assert stage._recomputed_slots() is not None
    assert torch.autograd.gradgradcheck(stage, (x,), eps=1e-6, atol=1e-4)


@pytest.mark.parametrize('channels_last', [False, True])
def test_resnet_pe_strided_entry_never_writes_the_widened_tensor(channels_last):
    """No op of a strided PE stage's training step (forward, recomputation, backward) or inference
    outputs a (B, C, H, W) tensor: the widened input and its gradient are never written."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves
    shapes = set()

    class Shapes(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            shapes.update(tuple(t.shape) for t in tree_leaves(out) if isinstance(t, torch.Tensor))
            return out
    stage = create_model('resnet26_pe_cifar').layer3.train()
    x = torch.randn(2, 128, 16, 16, requires_grad=True)
    if channels_last:
        stage = stage.to(memory_format=torch.channels_last)
        x = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    with Shapes():
        stage(x).sum().backward()
        stage.eval()
        with torch.no_grad():
            stage(x)
    assert (2, 128, 16, 16) in shapes and (2, 256, 8, 8) in shapes  # the recorder sees the parts and the output
    assert (2, 256, 16, 16) not in shapes
    assert stage.w.weight.grad is not None and x.grad.shape == x.shape


def test_resnet_pe_compiles_in_one_graph_under_cpu_bf16():
    """torch.compile captures the PE ResNet's training step whole (the split stage entry and the
    fp32 depthwise conv's own autograd function, no graph break) with eager's gradients."""
    torch.manual_seed(0)
    model = create_model('resnet26_pe_cifar').train().to(memory_format=torch.channels_last)
    eager = copy.deepcopy(model)
    x = torch.randn(4, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    for m in (torch.compile(model, backend='aot_eager', fullgraph=True), eager):
        with torch.autocast('cpu', torch.bfloat16):
            y = m(x)
        y.float().square().sum().backward()
    for (n, p), (_, q) in zip(model.named_parameters(), eager.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-2, atol=1e-2, msg=n)


@pytest.mark.parametrize('tie', ['stage', 'none', 'block'])
@pytest.mark.parametrize('channels_last', [False, True])
def test_resnet_pe_split_entry_equals_the_widened_tensor_path(tie, channels_last):
    """Training through the split stage entry gives the outputs, gradients and running statistics
    of the entry that builds [new, x] (taken when the depthwise conv carries a hook); float64, so
    that the two summation orders agree to 1e-10 (in fp32 train-mode BNs amplify their rounding)."""
    torch.manual_seed(0)
    model = create_model('resnet26_pe_cifar', tie=tie).train().double()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5), m.bias.normal_()
    widened = copy.deepcopy(model)
    shapes = []
    for stage in (widened.layer3, widened.layer4):
        stage.downsample[0].register_forward_hook(lambda mod, inp, out: shapes.append(tuple(inp[0].shape)))
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    if channels_last:
        model, widened = model.to(memory_format=torch.channels_last), widened.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    got, want = _train_step(model, x), _train_step(widened, x)
    assert (4, 256, 16, 16) in shapes  # the reference did read the widened tensor
    for a, b in zip(got[:2], want[:2]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    for part in (2, 3):
        for key in got[part]:
            torch.testing.assert_close(got[part][key], want[part][key], rtol=1e-10, atol=1e-10, msg=key)


def test_resnet_pe_entry_saves_less_for_backward():
    """What the PE stage entry holds for the backward pass: only its input, with the recomputation."""
    from rowcol.models.resnet import PeStage
    stage = create_model('resnet26_pe_cifar').layer3.train()
    x = torch.randn(8, 128, 16, 16)
    sizes = {}
    for recompute in (True, False):
        PeStage.recompute_entry = recompute
        seen = {}
        with torch.autograd.graph.saved_tensors_hooks(
                lambda t: seen.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()) and t,
                lambda t: t):
            stage(x)
        sizes[recompute] = sum(seen.values())
    PeStage.recompute_entry = True
    half = 8 * 128 * 16 * 16 * 4  # bytes of the (B, C_in, H, W) fp32 stage input: the widening adds as many
    assert sizes[False] - sizes[True] >= half * 4  # the new channels before and after BN and GELU, and the input


@pytest.mark.parametrize('name', ['vit_pe_micro_patch4_16', 'resnet26_pe_cifar', 'vit_pe_tiny_patch16_224'])
def test_safetensors_round_trip_keeps_tie(name, tmp_path):
    model, x = _small(name)
    model.eval()
    save_weights(model, tmp_path / 'm.safetensors')
    fresh, _ = _small(name)
    load_weights(fresh.eval(), tmp_path / 'm.safetensors')
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
    # still tied after loading: perturbing the one W moves both of its maps
    lin = tied_modules(fresh)[0][1]
    y = torch.randn(3, lin.out_features)
    before = lin.forward_t(y)
    with torch.no_grad():
        lin.weight.mul_(2)
    assert not torch.allclose(lin.forward_t(y), before)


def test_load_refuses_mismatch(tmp_path):
    save_weights(create_model('vit_pe_micro_patch4_16'), tmp_path / 'a.safetensors')
    with pytest.raises(CheckpointError, match='does not fit'):
        load_weights(create_model('vit_pe_micro_patch4_16', num_classes=3), tmp_path / 'a.safetensors')
    with pytest.raises(CheckpointError, match='does not fit'):
        load_weights(create_model('vit_micro_patch4_16'), tmp_path / 'a.safetensors')
    (tmp_path / 'bad.safetensors').write_bytes(b'garbage')
    with pytest.raises(CheckpointError, match='bad.safetensors'):
        load_weights(create_model('vit_pe_micro_patch4_16'), tmp_path / 'bad.safetensors')


@pytest.mark.parametrize('name', ['vit_pe_micro_patch4_16', 'resnet26_pe_cifar'])
def test_timm_interface(name):
    model = create_model(name)
    size = model.pretrained_cfg['input_size'][-1]
    x = torch.randn(2, 3, size, size)
    feats = model.forward_features(x)
    assert model.forward_head(feats, pre_logits=True).shape == (2, model.num_features)
    assert model.forward_head(feats).shape == (2, 10)
    model.reset_classifier(4)
    assert model(x).shape == (2, 4)
    assert isinstance(model.no_weight_decay(), set)
    model.set_grad_checkpointing(True)
    model(x).sum().backward()


def test_unknown_model_suggests_names():
    with pytest.raises(ModelNameError, match='vit_pe_small_patch16_224'):
        create_model('vit_pe_smal_patch16_224')


def test_pretrained_needs_a_local_file_and_loads_it_the_timm_way(tmp_path):
    with pytest.raises(ValueError, match='no pretrained weights; pass a local file'):
        create_model('resnet50_pe', pretrained=True)
    for name in ('vit_pe_micro_patch4_16', 'resnet26_pe_cifar'):
        torch.manual_seed(1)
        model = create_model(name).eval()
        path = tmp_path / f'{name}.safetensors'
        save_model(model, str(path))
        torch.manual_seed(2)
        loaded = create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
        x = torch.randn(2, 3, *model.pretrained_cfg['input_size'][1:])
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
        head = create_model(name, pretrained=True, num_classes=5, pretrained_cfg_overlay=dict(file=str(path)))
        assert head(x).shape == (2, 5)  # timm drops the classifier of another size


def test_ablation_kwargs():
    dense_attn = create_model('vit_pe_micro_patch4_16', attn_form='dense')
    assert count_params(dense_attn) > count_params(create_model('vit_pe_micro_patch4_16'))
    ident = create_model('vit_pe_micro_patch4_16', mlp_act='identity')
    assert isinstance(ident.blocks[0].mlp.act, nn.Identity)
    assert rowcol.pe_spec('resnet50') is None


def test_untied_layout_gets_the_tied_init():
    """tie='none' starts W1, W2 from the same Xavier-normal init as the tied W (only the tie differs)."""
    model = create_model('resnet50_pe_untied')
    blk = model.layer3.blocks[1]
    m, c = blk.conv1.weight.shape[:2]
    xavier_std = (2 / (m + c)) ** 0.5
    for w in (blk.conv1.weight, blk.conv3.weight, create_model('resnet50_pe').layer3.w.weight):
        assert abs(w.std().item() / xavier_std - 1) < 0.05


def test_dense_vit_rejects_pe_only_arguments():
    with pytest.raises(ValueError, match='PE models only'):
        create_model('vit_micro_patch4_16', attn_form='vo')
    assert isinstance(create_model('vit_micro_patch4_16', mlp_act='relu').blocks[0].mlp.act, nn.ReLU)


def test_resnet_pe_bf16_autocast_matches_fp32_closely():
    model = create_model('resnet26_pe_cifar').eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            low = model(x).float()
    assert torch.isfinite(low).all() and (low - ref).abs().max() < 0.1 * ref.abs().max() + 0.05


def test_resnet_pe_stage_entry_respects_each_batchnorm_own_mode():
    """Frozen (timm's FrozenBatchNorm2d) or eval-mode BatchNorms in a training model run as
    themselves in the stage entry: no error, no batch statistics, running statistics unchanged."""
    from timm.layers import freeze_batch_norm_2d
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    frozen = freeze_batch_norm_2d(create_model('resnet26_pe_cifar')).train()
    frozen(x).sum().backward()  # FrozenBatchNorm2d has no momentum: the entry must not treat it as a BatchNorm2d
    model = create_model('resnet26_pe_cifar').train()
    bns = [m for m in model.layer3.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in bns:
        bn.eval()
    before = [bn.running_mean.clone() for bn in bns]
    model(x).sum().backward()
    assert all(torch.equal(b, bn.running_mean) for b, bn in zip(before, bns))
    model.eval()
    for bn in bns:
        bn.train()  # re-calibration: BNs in training mode inside an eval model keep updating
    with torch.no_grad():
        model(x)
    ds1, ds2 = model.layer3.downsample[1], model.layer3.downsample[2]
    assert not torch.equal(before[bns.index(ds1)], ds1.running_mean)  # not folded away by the eval path
    assert not torch.equal(before[bns.index(ds2)], ds2.running_mean)


@pytest.mark.parametrize('variant', ['gelu_tanh', 'bn_without_affine', 'frozen_conv', 'bf16'])
def test_resnet_pe_widening_differentiated_on_its_own_equals_one_graph(variant, monkeypatch):
    """The recomputed entry's second phase (the widening differentiated by hand) gives the gradients
    of the entry differentiated in one graph: with a tanh GELU, a BN without affine parameters, a
    frozen widening conv under an input that needs its gradient, and under CPU bf16 autocast
    (tolerance relative to each gradient's largest entry: fp32 1e-5, bf16 1e-2, its rounding)."""
    import rowcol.models.resnet as resnet
    two_phase = resnet._plain_widening
    torch.manual_seed(0)
    stage = create_model('resnet26_pe_cifar').layer3.train()
    if variant == 'gelu_tanh':
        stage.widen[2].approximate = 'tanh'
    elif variant == 'bn_without_affine':
        stage.widen[1] = nn.BatchNorm2d(stage.widen[1].num_features, affine=False)
    elif variant == 'frozen_conv':
        stage.widen[0].weight.requires_grad_(False)
    with torch.no_grad():
        for m in stage.modules():
            if isinstance(m, nn.BatchNorm2d) and m.affine:
                m.weight.uniform_(0.5, 1.5), m.bias.normal_()
    one = copy.deepcopy(stage)
    x = torch.randn(4, 128, 16, 16)

    def grads(s, widening_on_its_own):
        monkeypatch.setattr(resnet, '_plain_widening', two_phase if widening_on_its_own else lambda s: False)
        assert s._recomputed_slots() is not None and resnet._plain_widening(s) == widening_on_its_own
        xg = x.clone().requires_grad_()
        with torch.autocast('cpu', torch.bfloat16, enabled=variant == 'bf16'):
            y = s(xg)
        y.float().square().sum().backward()
        return {'x': xg.grad, **{n: p.grad for n, p in s.named_parameters()}}
    got, want = grads(stage, True), grads(one, False)
    tol = 1e-2 if variant == 'bf16' else 1e-5  # bf16: the input's gradient is summed in bf16 on one graph
    assert got.keys() == want.keys() and ('widen.1.weight' in got) == (variant != 'bn_without_affine')
    for n in want:
        assert (got[n] is None) == (want[n] is None) == (variant == 'frozen_conv' and n == 'widen.0.weight'), n
        if want[n] is not None:
            torch.testing.assert_close(got[n], want[n], rtol=tol, atol=tol * want[n].abs().max().item(), msg=n)
