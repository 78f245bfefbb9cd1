"""The mechanism probe: energy outside col(W) of what Wᵀ receives."""
import json

import pytest
import torch

from rowcol.apps.analyze import _dense_slots, _record, analyze_run, outside_fraction, stable_rank
from rowcol.apps.cli import main
from rowcol.errors import CheckpointError
from rowcol.layers import TiedLinear
from rowcol.models import create_model


def test_outside_fraction_by_construction():
    w = torch.randn(8, 3)  # col(W) is 3-dimensional in R^8
    assert outside_fraction(w, torch.randn(50, 3) @ w.T) < 1e-12  # inside
    q = torch.linalg.qr(w, mode='complete').Q[:, 3:]  # the orthogonal complement
    assert abs(outside_fraction(w, torch.randn(50, 5) @ q.T) - 1) < 1e-12
    frac = outside_fraction(w, torch.randn(20000, 8))
    assert abs(frac - 5 / 8) < 0.02  # isotropic vectors: 5 of 8 dimensions lie outside


def _mlp_fractions(**kwargs):
    model = create_model('vit_pe_micro_patch4_16', **kwargs).eval()
    with _record(model) as stats, torch.no_grad():
        model(torch.randn(8, 3, 16, 16))
    return {n: s.outside / s.total for n, s in stats.items() if n.endswith('mlp.fc')}


def test_identity_breaks_the_mechanism_and_gelu_does_not():
    ident = _mlp_fractions(mlp_act='identity')  # fresh biases are zero: h = W x lies in col(W)
    gelu = _mlp_fractions()
    assert len(ident) == 4 and max(ident.values()) < 1e-10
    assert min(gelu.values()) > 1e-3


def test_analyze_cli_on_a_run(tmp_path, capsys):
    pe, dense = tmp_path / 'pe', tmp_path / 'dense'
    for model, out in (('vit_pe_micro_patch4_16', pe), ('vit_micro_patch4_16', dense)):
        assert main(['train', '--model', model, '--recipe', 'digits', '--max-steps', '2', '--output', str(out),
                     '--quiet']) == 0
    capsys.readouterr()
    assert main(['analyze', '--checkpoint', str(pe), '--data', 'digits', '--dense-checkpoint', str(dense),
                 '--num-images', '64', '--json']) == 0
    res = json.loads(capsys.readouterr().out)
    assert res['num_images'] == 64 and (pe / 'analysis.png').is_file()
    names = [r['name'] for r in res['layers']]
    assert 'blocks.0.mlp.fc' in names and 'blocks.0.attn.kv' in names
    mlp = res['layers'][names.index('blocks.0.mlp.fc')]
    assert 0 < mlp['outside_fraction'] < 1 and mlp['vectors'] == 64 * 17 and not mlp['col_space_is_all']
    assert res['layers'][names.index('blocks.0.attn.kv')]['col_space_is_all']  # square W: nothing outside
    assert set(mlp['dense_singular_values']) == {'blocks.0.mlp.fc1.weight', 'blocks.0.mlp.fc2.weight'}
    assert len(mlp['singular_values']) == 96
    assert 1 <= mlp['stable_rank'] <= 96 and set(mlp['dense_stable_rank']) == set(mlp['dense_singular_values'])
    assert stable_rank([2.0, 2.0, 0.0]) == 2 and stable_rank([3.0, 0.0]) == 1


def test_dense_slots_of_resnet_stage_and_block_ties():
    dense = create_model('resnet26_cifar').state_dict()
    stage = _dense_slots('layer3.w', dense)  # one W per stage does the job of every block's pair
    assert set(stage) == {f'layer3.{b}.conv{c}.weight' for b in (0, 1) for c in (1, 3)}
    block = _dense_slots('layer4.blocks.1.w', dense)  # one W per block: that block's pair only
    assert set(block) == {'layer4.1.conv1.weight', 'layer4.1.conv3.weight'}
    assert all(len(v) == 128 for v in block.values())  # min(128, 512) singular values
    pe = create_model('resnet26_pe_cifar').state_dict()
    assert set(_dense_slots('layer3.w', dense, tuple(pe['layer3.w.weight'].flatten(1).shape))) == set(stage)
    # block 0's conv1 reads the stage input (128 channels), W the widened one (256): conv3 fits W
    w0 = create_model('resnet26_pe_cifar', tie='block').state_dict()['layer3.blocks.0.w.weight']
    assert set(_dense_slots('layer3.blocks.0.w', dense, tuple(w0.shape))) == {'layer3.0.conv1.weight',
                                                                             'layer3.0.conv3.weight'}


def test_dense_checkpoint_of_another_width_or_depth_is_refused():
    dense = create_model('vit_micro_patch4_16').state_dict()
    w = create_model('vit_pe_micro_patch4_16').state_dict()['blocks.0.mlp.fc.weight']
    assert set(_dense_slots('blocks.0.mlp.fc', dense, tuple(w.shape))) == {'blocks.0.mlp.fc1.weight',
                                                                          'blocks.0.mlp.fc2.weight'}
    wide = create_model('vit_pe_micro_patch4_16', embed_dim=48, num_heads=3).state_dict()['blocks.0.mlp.fc.weight']
    with pytest.raises(CheckpointError, match=r'blocks\.0\.mlp\.fc .*blocks\.0\.mlp\.fc1\.weight \(384, 96\)'):
        _dense_slots('blocks.0.mlp.fc', dense, tuple(wide.shape), '--dense-checkpoint D')
    with pytest.raises(CheckpointError, match=r'blocks\.9\.attn\.q .*no matrix'):  # a block the twin lacks
        _dense_slots('blocks.9.attn.q', dense, (96, 96))
    assert _dense_slots('blocks.0.attn.vo', dense, (96, 96)) == {}  # a form with no dense counterpart


def test_dense_checkpoint_with_more_blocks_is_refused_before_reading_images(tmp_path):
    pe, dense = tmp_path / 'pe', tmp_path / 'dense'
    for model, out, kw in (('vit_pe_micro_patch4_16', pe, '{"depth": 2}'), ('vit_micro_patch4_16', dense, '{}')):
        assert main(['train', '--model', model, '--recipe', 'digits', '--max-steps', '1', '--output', str(out),
                     '--model-kwargs', kw, '--quiet']) == 0
    with pytest.raises(CheckpointError, match=r"blocks per stage \{'blocks': 4\}, this run \{'blocks': 2\}"):
        analyze_run(pe, str(tmp_path / 'no such folder'), dense_run=dense)  # the data is never opened


def test_record_counts_each_channels_last_conv_t_input_once():
    m = TiedLinear(8, 4)
    x = torch.randn(2, 4, 3, 5).contiguous(memory_format=torch.channels_last)
    with _record(m) as stats, torch.no_grad():
        y = m.conv_t(x)
    assert y.is_contiguous(memory_format=torch.channels_last) and y.shape == (2, 8, 3, 5)
    assert stats[''].count == 2 * 3 * 5
