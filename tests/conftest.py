"""Shared pytest fixtures and helpers for the mmfusionload test suite."""
import json
from pathlib import Path
from typing import Any, Callable, Dict

import pytest
import torch

#: Folder holding the state-dict manifests shipped with the tests (copies of
#: the manifests measured on the real BEVFusion / EfficientViT models).
MANIFEST_DIR = Path(__file__).parent / 'data' / 'manifests'


def pytest_configure(config: pytest.Config) -> None:
    # pytest.ini may already declare it; register it once either way.
    if not any(line.split(':')[0].strip() == 'cuda'
               for line in config.getini('markers')):
        config.addinivalue_line(
            'markers', 'cuda: runs the same assertions on a CUDA device '
            '(skipped without CUDA)')


@pytest.fixture(params=[
    'cpu',
    pytest.param(
        'cuda',
        marks=[
            pytest.mark.cuda,
            pytest.mark.skipif(
                not torch.cuda.is_available(), reason='CUDA is not available'),
        ]),
])
def device(request: pytest.FixtureRequest) -> torch.device:
    """The device a test runs on: ``cpu`` always, ``cuda`` when present."""
    return torch.device(request.param)


def load_manifest(name: str) -> Dict[str, Any]:
    """Load ``tests/data/manifests/<name>.json``.

    A manifest is a dict with ``model`` (a description), ``num_tensors``,
    ``num_params``, ``tensors`` (a list of ``{'key', 'shape', 'dtype',
    'kind'}`` with ``kind`` ``'param'`` or ``'buffer'``) and, for the
    MMDetection3D ones, ``sparse_conv_layout`` and ``sparse_conv_modules``
    (sparse-conv module prefix -> ``_metadata`` version).

    Args:
        name (str): File name without ``.json``, e.g.
            ``'mmdet3d_bevfusion_lidar-cam_spconv2'``.

    Returns:
        dict: The parsed manifest.
    """
    path = MANIFEST_DIR / f'{name}.json'
    with open(path, encoding='utf-8') as f:
        return json.load(f)


@pytest.fixture
def manifest() -> Callable[[str], Dict[str, Any]]:
    """Fixture returning :func:`load_manifest`."""
    return load_manifest
