#!/usr/bin/env bash
# Set up everything mmfusionload needs, idempotently, with built wheels cached outside the repo.
#
#   bash tools/setup_env.sh            # creates ./.venv (Python 3.11) and installs the stack
#   MMFL_VENV=none bash tools/setup_env.sh   # installs into the active Python instead
#
# Environment:
#   MMFL_VENV    venv path (default .venv), or "none" for the active interpreter.
#   MMFL_PYTHON  interpreter that creates the venv (default python3.11, else python3).
#   MMFL_CACHE   wheel cache (default ${XDG_CACHE_HOME:-~/.cache}/mmfusionload).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
cache=${MMFL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/mmfusionload}
mkdir -p "$cache/wheels"
venv=${MMFL_VENV:-.venv}
t0=$SECONDS
step() { echo "[setup +$((SECONDS - t0))s] $*"; }

if [ "$venv" != none ]; then
  if [ ! -x "$venv/bin/python" ]; then
    py=${MMFL_PYTHON:-$(command -v python3.11 || command -v python3)}
    step "creating $venv with $py"
    "$py" -m venv "$venv"
  fi
  PY="$root/$venv/bin/python"
  [ -x "$PY" ] || PY="$venv/bin/python"
else
  PY=$(command -v python)
fi
pip_() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }
has() { "$PY" -c "import importlib.metadata as m, sys; sys.exit(m.version('$1') != '$2')" 2>/dev/null; }

# 1. torch: keep an installed one (e.g. a CUDA build); otherwise the pinned CPU build.
#    numpy comes first or with it: torch imported without numpy warns "Failed to initialize
#    NumPy" (the torch wheel does not depend on numpy).
numpy_req=$(grep -E '^numpy' requirements/runtime.txt)
if "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -c "import numpy" 2>/dev/null || { step "installing $numpy_req"; pip_ "$numpy_req"; }
  step "keeping installed torch $("$PY" -c 'import torch; print(torch.__version__)')"
else
  step "installing torch==2.13.0 and $numpy_req"
  pip_ torch==2.13.0 "$numpy_req"
fi
torch_ver=$("$PY" -c "import torch; print(torch.__version__.split('+')[0])")
cuda=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))")
# Every later install is held to this torch, so no dependency swaps it for a CUDA build.
cons="$cache/constraints-torch-$torch_ver.txt"
echo "torch==$torch_ver" > "$cons"
export PIP_CONSTRAINT="$cons"

# 2. build tools and MMEngine (setuptools<82 keeps pkg_resources for MMCV's build and pkg:: configs)
has mmengine 0.10.7 || { step "installing mmengine"; pip_ -r requirements/base.txt; }

# 3. MMCV with its compiled ops, built once per (mmcv, torch, cuda, python) and cached here
#    (--no-cache-dir: pip's own wheel cache is keyed by the sdist only, so it would hand back
#    a wheel built for another torch, CUDA setting or flags).
pyver=$("$PY" -c "import sys; print(f'cp{sys.version_info[0]}{sys.version_info[1]}')")
mmcv_dir="$cache/wheels/mmcv-2.1.0-torch$torch_ver-cuda$cuda-$pyver"
if ! has mmcv 2.1.0 || ! "$PY" -c "import mmcv.ops" 2>/dev/null; then
  if ! ls "$mmcv_dir"/mmcv-*.whl >/dev/null 2>&1; then
    step "building mmcv 2.1.0 with ops (5 minutes or more on 2 cores)"
    mkdir -p "$mmcv_dir"
    # The whole flag set (setuptools replaces Python's default flags with these): no debug
    # info, and -O1 for the host C++ (MMCV's CPU ops and dispatch): most files' time is
    # parsing torch's headers, but pybind.cpp, the longest, takes 36 s instead of 56 s
    # (see docs/install.md); CUDA kernels keep nvcc's own flags.
    flags="-DNDEBUG -O1 -g0 -fwrapv -Wall -Wsign-compare"
    MMCV_WITH_OPS=1 FORCE_CUDA=$cuda MAX_JOBS=${MAX_JOBS:-2} CFLAGS="$flags" CXXFLAGS="$flags" \
      "$PY" -m pip wheel --disable-pip-version-check -q --no-build-isolation --no-deps --no-cache-dir \
      -w "$mmcv_dir" mmcv==2.1.0
  fi
  step "installing cached mmcv wheel"
  pip_ --no-deps --force-reinstall "$mmcv_dir"/mmcv-*.whl
fi

# 4. MMDetection, what MMDetection3D's models and registries import, spconv, test tools.
has mmdet 3.3.0 || { step "installing mmdet"; pip_ mmdet==3.3.0; }
step "installing runtime and test requirements"
pip_ -r requirements/runtime.txt -r requirements/tests.txt
if [ "$cuda" = 1 ]; then
  "$PY" -c "import spconv" 2>/dev/null || echo "CUDA found: install the spconv build for your CUDA, e.g. pip install spconv-cu120"
else
  has spconv 2.3.8 || { step "installing spconv (CPU)"; pip_ spconv==2.3.8; }
fi
# MMDetection3D and the two dataset toolkits its registries import, without their declared
# dependencies (open3d, numpy<2, linters...; see docs/install.md), and last: an install
# with dependencies after them would print pip's resolver complaint about those.
if ! has mmdet3d 1.4.0 || ! has nuscenes-devkit 1.2.0 || ! has lyft-dataset-sdk 0.0.8; then
  step "installing mmdet3d (models and registries only)"
  pip_ --no-deps mmdet3d==1.4.0 lyft-dataset-sdk==0.0.8 nuscenes-devkit==1.2.0
fi

# 5. the package itself
step "installing mmfusionload (editable)"
pip_ --no-deps --no-build-isolation -e .
"$PY" -c "import mmcv.ops, mmdet3d.models, mmfusionload; print('stack ok: torch', __import__('torch').__version__)"
step "done"
