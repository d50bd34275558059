"""Headless Chromium for the page tests: the DOM after the page's scripts ran, screenshots.

Debian's ``chromium`` (``.ci/run`` installs it when absent). Without it the tests skip, unless
``MMFL_REQUIRE_BROWSER=1`` (set by ``.ci/run``) makes its absence a failure.
"""
import os
import shutil
import subprocess
import tempfile
from typing import List

import pytest

NAMES = ('chromium', 'chromium-browser', 'google-chrome')
#: No network, no first-run work, a fresh profile: nothing but the page.
FLAGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
         '--disable-background-networking', '--disable-component-update', '--disable-sync',
         '--disable-extensions', '--hide-scrollbars']


def chromium() -> str:
    found = next((p for p in map(shutil.which, NAMES) if p), None)
    if found is None:
        if os.environ.get('MMFL_REQUIRE_BROWSER') == '1':
            pytest.fail('no chromium on PATH: apt-get install -y chromium')
        pytest.skip('no chromium on PATH (apt-get install -y chromium)')
    return found


def _run(args: List[str], timeout: int = 90) -> str:
    with tempfile.TemporaryDirectory(prefix='mmfl-chromium-') as profile:
        proc = subprocess.run([chromium()] + FLAGS + [f'--user-data-dir={profile}'] + args,
                              capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def dump_dom(path: str, fragment: str = '') -> str:
    """The page's DOM, serialized after its scripts ran (``fragment``: ``#...``)."""
    return _run(['--dump-dom', 'file://' + os.path.abspath(path) + fragment])


def screenshot(path: str, out: str, width: int = 1400, height: int = 1000,
               fragment: str = '') -> str:
    """A PNG of the page's first ``width`` x ``height`` pixels, written to ``out``."""
    _run([f'--screenshot={os.path.abspath(out)}', f'--window-size={width},{height}',
          'file://' + os.path.abspath(path) + fragment])
    return out
