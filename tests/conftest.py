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


@pytest.fixture
def one_thread():
    """One intra-op thread for the test, the count restored afterwards.

    spconv 2.3.8's CPU kernels race under several threads (outputs change from
    call to call); with one they are deterministic and compare exactly. Its CPU
    path also issues many tiny ``gather``/``mm`` calls that spin against each
    other with two OpenMP threads on two busy cores.
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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
