"""Remote checkpoints go through the restricted reader, whatever their scheme.

Each test serves files from a server on 127.0.0.1 and states the promise it checks:
no code a served pickle names runs (a marker file stays absent), a good file loads
with the same values, a file whose name carries a hash prefix is checked against it.
"""
import hashlib
import http.server
import json
import os
import os.path as osp
import tempfile
import threading
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn

import mmfusionload
from mmfusionload import FusionLoadError, load_sources, read_checkpoint


class _Evil:
    """Pickles to ``os.system('touch MARKER')``."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f'touch {self.marker}', )


@pytest.fixture
def served(tmp_path, monkeypatch):
    """A loopback HTTP server over ``tmp_path/www``; torch hub's cache and MMEngine's
    home in ``tmp_path``; the MMEngine loaders restored afterwards."""
    from mmengine.runner.checkpoint import CheckpointLoader
    www = tmp_path / 'www'
    www.mkdir()
    monkeypatch.setattr(torch.hub, '_hub_dir', str(tmp_path / 'hub'))
    monkeypatch.setenv('MMENGINE_HOME', str(tmp_path / 'mmengine'))
    monkeypatch.setattr(CheckpointLoader, '_schemes', OrderedDict(CheckpointLoader._schemes))

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(www), **kw)

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    marker = tmp_path / 'ran'
    torch.save({'state_dict': {'w': torch.ones(2)}, 'meta': _Evil(str(marker))},
               www / 'evil.pth')
    state = OrderedDict(weight=torch.arange(6.).reshape(2, 3), bias=torch.tensor([1., -1.]))
    torch.save({'state_dict': state}, www / 'good.pth')
    yield dict(url=f'http://127.0.0.1:{server.server_address[1]}', www=www, marker=marker,
               state=state, hub=tmp_path / 'hub' / 'checkpoints', home=tmp_path / 'mmengine')
    server.shutdown()
    server.server_close()


def test_http_pickle_is_refused_and_runs_nothing(served):
    # promise: no code a checkpoint names runs, from a URL as from a path
    with pytest.raises(FusionLoadError, match=r'evil\.pth.*system'):
        read_checkpoint(served['url'] + '/evil.pth')
    assert not served['marker'].exists()


def test_http_good_file_is_read_and_cached(served):
    # promise: a good remote file loads, from torch hub's cache folder
    ckpt = read_checkpoint(served['url'] + '/good.pth')
    assert torch.equal(ckpt['state_dict']['weight'], served['state']['weight'])
    assert (served['hub'] / 'good.pth').is_file()


def test_http_source_loads_into_model(served):
    # promise: load_sources reads a URL through the same door
    model = nn.Linear(3, 2)
    load_sources(model, [dict(checkpoint=served['url'] + '/good.pth')], logger=None)
    assert torch.equal(model.weight, served['state']['weight'])
    assert torch.equal(model.bias, served['state']['bias'])


def test_http_hostile_source_leaves_model_and_runs_nothing(served):
    model = nn.Linear(3, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(FusionLoadError, match='evil.pth'):
        load_sources(model, [dict(checkpoint=served['url'] + '/evil.pth')], logger=None)
    assert not served['marker'].exists()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_mmengine_loaders_use_the_reader_once_installed(served):
    # promise: load_from and init_cfg=Pretrained (MMEngine's _load_checkpoint) read URLs safely
    from mmengine.runner.checkpoint import _load_checkpoint, load_checkpoint
    mmfusionload.install_checkpoint_loader()
    with pytest.raises(FusionLoadError, match='system'):
        _load_checkpoint(served['url'] + '/evil.pth')
    with pytest.raises(FusionLoadError, match='system'):
        load_checkpoint(nn.Linear(3, 2), served['url'] + '/evil.pth')
    assert not served['marker'].exists()
    model = nn.Linear(3, 2)
    load_checkpoint(model, served['url'] + '/good.pth')
    assert torch.equal(model.weight, served['state']['weight'])


def test_open_mmlab_name_resolves_through_mmengine_table(served):
    # promise: open-mmlab:// names go through MMEngine's table, then the same door
    os.makedirs(served['home'], exist_ok=True)
    with open(served['home'] / 'open_mmlab.json', 'w') as f:
        json.dump({'evil_net': served['url'] + '/evil.pth',
                   'good_net': served['url'] + '/good.pth'}, f)
    with pytest.raises(FusionLoadError, match='system'):
        read_checkpoint('open-mmlab://evil_net')
    assert not served['marker'].exists()
    ckpt = read_checkpoint('openmmlab://good_net')
    assert torch.equal(ckpt['state_dict']['bias'], served['state']['bias'])
    with pytest.raises(FusionLoadError, match="'no_such_net' is not in MMEngine"):
        read_checkpoint('open-mmlab://no_such_net')


def test_hash_prefix_in_name_is_checked(served):
    # promise: a name following torch hub's '-<sha256 prefix>.' convention is checked
    data = (served['www'] / 'good.pth').read_bytes()
    right = hashlib.sha256(data).hexdigest()[:8]
    (served['www'] / f'net-{right}.pth').write_bytes(data)
    (served['www'] / 'net-0badc0de.pth').write_bytes(data)
    assert 'state_dict' in read_checkpoint(served['url'] + f'/net-{right}.pth')
    with pytest.raises(FusionLoadError, match='download failed'):
        read_checkpoint(served['url'] + '/net-0badc0de.pth')
    assert not (served['hub'] / 'net-0badc0de.pth').exists()


def test_missing_url_names_it(served):
    with pytest.raises(FusionLoadError, match=r'nothing\.pth: download failed: HTTPError'):
        read_checkpoint(served['url'] + '/nothing.pth')


def test_object_store_bytes_are_read_like_a_file(served):
    # promise: s3:// bytes (a file backend's get) go through the reader, not torch.load
    from mmengine.fileio import BaseStorageBackend, register_backend
    from mmengine.fileio.io import backends, prefix_to_backends

    www = served['www']

    class Folder(BaseStorageBackend):
        def get(self, filepath):
            return (www / filepath.split('/')[-1]).read_bytes()

        def get_text(self, filepath, encoding='utf-8'):
            raise NotImplementedError

    saved = dict(backends), dict(prefix_to_backends)
    def ours():
        return {n for n in os.listdir(tempfile.gettempdir()) if n.startswith('mmfusionload-')}

    temps = ours()
    try:
        register_backend('test_s3', Folder, force=True, prefixes='s3')
        with pytest.raises(FusionLoadError, match=r's3://bucket/evil\.pth.*system'):
            read_checkpoint('s3://bucket/evil.pth')
        assert not served['marker'].exists()
        ckpt = read_checkpoint('s3://bucket/good.pth')
        assert torch.equal(ckpt['state_dict']['weight'], served['state']['weight'])
    finally:
        backends.clear()
        backends.update(saved[0])
        prefix_to_backends.clear()
        prefix_to_backends.update(saved[1])
    assert ours() <= temps  # the private copy is gone


def test_runner_load_from_url_with_the_hook(served, tmp_path):
    # promise: a Runner's load_from URL goes through the reader once the hook is built
    import sys
    sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))
    from mmengine.runner import Runner
    from tiny_fusion import TinyFusion
    runner = Runner(model=TinyFusion(), work_dir=str(tmp_path / 'work'), default_scope='mmdet3d',
                    load_from=served['url'] + '/evil.pth',
                    custom_hooks=[dict(type='FusionLoadHook', sources=[])],
                    env_cfg=dict(dist_cfg=dict(backend='gloo')))
    with pytest.raises(FusionLoadError, match='system'):
        runner.load_or_resume()
    assert not served['marker'].exists()
