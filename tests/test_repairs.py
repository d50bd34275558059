"""Repairs as separate units: position-bias resizing, user-registered repairs and modalities."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from builders import build, randomize
from mmfusionload import (MODALITIES, REPAIRS, FusionLoadError, Repair, load_sources,
                          register_modality)
from mmfusionload.load.repairs import resize_attention_biases, resize_relative_position_table


def test_attention_biases_resize_is_bicubic_over_offset_grid():
    t = torch.randn(4, 16)
    want = F.interpolate(t.view(1, 4, 4, 4), size=(7, 7), mode='bicubic',
                         align_corners=False).view(4, 49)
    assert torch.equal(resize_attention_biases(t, 7), want)


def _swin(window):
    return build(dict(type='mmdet.SwinTransformer', embed_dims=48, depths=[2, 2],
                      num_heads=[3, 6], window_size=window, out_indices=(0, 1),
                      convert_weights=False))


def test_swin_relative_position_table_resized_into_bigger_window(tmp_path):
    src = randomize(_swin(7), seed=1)
    dst = _swin(12)
    torch.save({'state_dict': {'backbone.' + k: v for k, v in src.state_dict().items()}},
               tmp_path / 'swin7.pth')
    report = load_sources(dst, [dict(checkpoint=str(tmp_path / 'swin7.pth'))], logger=None)
    s = report.sources[0]
    key = 'stages.0.blocks.0.attn.w_msa.relative_position_bias_table'
    assert key in s.adapted['resize'] and len(s.adapted['resize']) == 4
    table = src.state_dict()[key]  # [(2*7-1)^2, 3]
    want = F.interpolate(table.t().reshape(1, 3, 13, 13), size=(23, 23), mode='bicubic',
                         align_corners=False).reshape(3, 529).t()
    assert torch.equal(dst.state_dict()[key], want)
    assert torch.equal(resize_relative_position_table(table, 23), want)
    assert len(s.regenerated) == 4 and s.missing == []
    # every other tensor arrives unchanged
    for k, v in src.state_dict().items():
        if 'relative_position' not in k:
            assert torch.equal(dst.state_dict()[k], v), k


def test_head_count_mismatch_names_the_key(tmp_path):
    model = nn.Module()
    model.attn = nn.Module()
    model.attn.attention_biases = nn.Parameter(torch.zeros(4, 49))
    torch.save({'attn.attention_biases': torch.randn(3, 16)}, tmp_path / 'b.pth')
    with pytest.raises(FusionLoadError, match=r'attn.attention_biases.*3 heads.*4 in the model'):
        load_sources(model, [dict(checkpoint=str(tmp_path / 'b.pth'))], logger=None)
    assert torch.equal(model.attn.attention_biases, torch.zeros(4, 49))


def test_user_registered_repair_and_modality(tmp_path):

    @REPAIRS.register_module(force=True)
    class Transpose2D(Repair):
        """A repair a user adds: checkpoints of a tool that saves Linear weights transposed."""
        name = 'transpose'
        priority = 30

        def __call__(self, entry):
            if entry.key.endswith('proj.weight') and entry.shape == entry.target.shape[::-1]:
                entry.add_step(self.name, lambda t: t.t().contiguous(),
                               shape=entry.target.shape)

    try:
        register_modality('radar', ('radar_encoder', ), force=True)
        model = nn.Module()
        model.radar_encoder = nn.Module()
        model.radar_encoder.proj = nn.Linear(3, 5)
        model.other = nn.Linear(2, 2)
        w, b = torch.randn(3, 5), torch.randn(5)
        torch.save({'proj.weight': w, 'proj.bias': b}, tmp_path / 'r.pth')
        before = model.other.weight.detach().clone()
        report = load_sources(model, [dict(modality='radar', checkpoint=str(tmp_path / 'r.pth'))],
                              logger=None)
        assert report.sources[0].adapted == {'transpose': ['radar_encoder.proj.weight']}
        assert torch.equal(model.radar_encoder.proj.weight, w.t())
        assert torch.equal(model.radar_encoder.proj.bias, b)
        assert torch.equal(model.other.weight, before)
    finally:
        REPAIRS.module_dict.pop('Transpose2D', None)
        MODALITIES.module_dict.pop('radar', None)


def test_register_derived_takes_effect_between_loads(tmp_path):
    """Derived-key decisions follow the pattern lists as they are at each load."""
    from mmfusionload.load.repairs.derived import DERIVED_ALWAYS, DERIVED_IF_DIFFERENT
    from mmfusionload import register_derived

    model = nn.Module()
    model.enc = nn.Linear(2, 2)
    model.enc.register_buffer('grid', torch.zeros(4))
    grid = torch.arange(4.)
    path = tmp_path / 'g.pth'
    torch.save({'enc.weight': torch.ones(2, 2), 'enc.bias': torch.ones(2), 'enc.grid': grid},
               path)

    def load():
        return load_sources(model, [dict(checkpoint=str(path))], logger=None).sources[0]

    saved = list(DERIVED_ALWAYS), list(DERIVED_IF_DIFFERENT)
    try:
        assert 'enc.grid' in load().loaded and torch.equal(model.enc.grid, grid)
        model.enc.grid.zero_()
        register_derived(r'(^|\.)grid$', always=True)
        rep = load()
        assert rep.regenerated == ['enc.grid'] and not model.enc.grid.any()
        DERIVED_ALWAYS[:] = saved[0]
        register_derived(r'(^|\.)grid$', always=False)
        assert load().regenerated == ['enc.grid']  # differs from the live value
        DERIVED_IF_DIFFERENT[:] = saved[1]
        assert 'enc.grid' in load().loaded and torch.equal(model.enc.grid, grid)
    finally:
        DERIVED_ALWAYS[:], DERIVED_IF_DIFFERENT[:] = saved
