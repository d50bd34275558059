"""Every safetensors dtype into an int64 buffer and a float32 parameter: the values
land exactly, or the load fails with a ``FusionLoadError`` naming file and key.

The dtypes are the ones safetensors 0.8.0 reads (``safetensors.torch._TYPES``); the
expected values are computed by torch alone (the file's values as float64, cast to
the model's dtype), never by this package.
"""
import pytest
import torch
import torch.nn as nn
from safetensors.torch import _TYPES, save_file

from mmfusionload import FusionLoadError, load_sources

VALUES = [0.0, 1.0, 3.0]


class Two(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer('count', torch.full((3, ), 9, dtype=torch.int64))
        self.weight = nn.Parameter(torch.full((3, ), 9.0))


class One(nn.Module):
    """A model of one tensor ``t`` of ``dtype``."""

    def __init__(self, dtype):
        super().__init__()
        self.register_buffer('t', torch.full((3, ), 9, dtype=dtype))


#: What must load: same kind (int into int, float into float), and every unsigned
#: int into int64, every float8 into float32.
def _must_load(src: torch.dtype, dst: torch.dtype) -> bool:
    return (src.is_floating_point and dst.is_floating_point) or (
        not src.is_floating_point and not src.is_complex and src != torch.bool
        and not dst.is_floating_point)


@pytest.mark.parametrize('dst', [torch.int64, torch.float32])
@pytest.mark.parametrize('name', sorted(_TYPES))
def test_each_dtype_loads_exactly_or_is_refused_by_name(tmp_path, name, dst):
    dt = _TYPES[name]
    vals = [0.0, 1.0, 1.0] if dt == torch.bool else VALUES
    path = tmp_path / f'{name}.safetensors'
    save_file({'t': torch.tensor(vals, dtype=torch.float64).to(dt)}, str(path))
    model = One(dst)
    try:
        load_sources(model, [dict(checkpoint=str(path))], logger=None)
    except FusionLoadError as e:
        assert not _must_load(dt, dst), str(e)
        assert str(path) in str(e) and ': t ' in str(e), str(e)
        assert model.t.tolist() == [9, 9, 9]
        return
    assert torch.equal(model.t, torch.tensor(vals, dtype=torch.float64).to(dst))


@pytest.mark.parametrize('name', [n for n, d in sorted(_TYPES.items())
                                  if d.is_floating_point and d.itemsize == 1])
def test_float8_nan_is_refused_by_key(tmp_path, name):
    """A float8 NaN: ``isfinite`` had no float8 kernel (``NotImplementedError``)."""
    path = tmp_path / f'{name}.safetensors'
    bad = torch.tensor([0.5, float('nan'), 2.0]).to(_TYPES[name])
    save_file({'count': torch.tensor([1, 2, 3]), 'weight': bad}, str(path))
    model = Two()
    with pytest.raises(FusionLoadError, match='weight holds 1 NaN/Inf') as e:
        load_sources(model, [dict(checkpoint=str(path))], logger=None)
    assert str(path) in str(e.value)
    assert torch.equal(model.weight.detach(), torch.full((3, ), 9.0))


@pytest.mark.parametrize('name,values,ok', [
    ('U64', [0, 1, (1 << 63) - 1], True),
    ('U64', [0, 1 << 63, 5], False),
    ('U64', [0, (1 << 64) - 1, 5], False),
    ('U32', [0, (1 << 32) - 1, 5], True),
    ('U16', [0, 65535, 5], True),
])
def test_unsigned_into_int64_widened_with_a_range_check(tmp_path, name, values, ok):
    """``aminmax`` had no uint16/uint32/uint64 kernel: widened to int64 exactly."""
    path = tmp_path / f'{name}.safetensors'
    bits = torch.tensor([v - (1 << 64) if v >= 1 << 63 else v for v in values],
                        dtype=torch.int64)
    src = bits.view(torch.uint64) if name == 'U64' else bits.to(_TYPES[name])
    save_file({'count': src, 'weight': torch.ones(3)}, str(path))
    model = Two()
    if ok:
        load_sources(model, [dict(checkpoint=str(path))], logger=None)
        assert model.count.tolist() == values
        return
    with pytest.raises(FusionLoadError, match='count holds uint64 values of 2\\*\\*63') as e:
        load_sources(model, [dict(checkpoint=str(path))], logger=None)
    assert str(path) in str(e.value) and model.count.tolist() == [9, 9, 9]
