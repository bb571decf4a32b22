#!/usr/bin/env bash
# Install mmdyn and its OpenMMLab stack into the active Python environment.
#
#   bash tools/install.sh
#
# Installs, only where missing or of the wrong version (a second run changes
# nothing): torch 2.14.1 + torchvision 0.29.1 (only when torch is absent),
# mmengine 0.10.7, mmcv 2.1.0 with its compiled ops (a prebuilt wheel when pip
# finds one that imports beside the installed torch, else built from the PyPI
# source), mmdet 3.3.0, mmpretrain 1.2.0, pytest, onnx, onnxruntime, and mmdyn
# itself in editable mode.
#
# Environment: PYTHON (default: python), PIP_FIND_LINKS (extra wheel folders,
# e.g. a folder holding an mmcv wheel built against your torch),
# MMDYN_FORCE_MMCV_BUILD=1 to ignore any prebuilt mmcv wheel. Without torch and
# without an NVIDIA GPU (no nvidia-smi), torch's CPU build is tried first from
# MMDYN_TORCH_CPU_INDEX (default https://download.pytorch.org/whl/cpu), then
# PyPI; MMDYN_TORCH_CPU=0 goes to PyPI directly.
set -euo pipefail

PYTHON=${PYTHON:-python}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TORCH_VERSION=2.14.1
TORCHVISION_VERSION=0.29.1
TORCH_CPU_INDEX=${MMDYN_TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}
MMENGINE_VERSION=0.10.7
MMCV_VERSION=2.1.0
MMDET_VERSION=3.3.0
MMPRETRAIN_VERSION=1.2.0

log() { echo "[mmdyn install] $*"; }
die() { echo "[mmdyn install] ERROR: $*" >&2; exit 1; }
pip_install() { log "pip install $*"; "$PYTHON" -m pip install --no-cache-dir "$@" || die "pip install $* failed"; }

# version NAME -> installed version of distribution NAME, or nothing.
version() {
    "$PYTHON" - "$1" <<'EOF' 2>/dev/null || true
import importlib.metadata as m, sys
try:
    print(m.version(sys.argv[1]))
except m.PackageNotFoundError:
    pass
EOF
}

"$PYTHON" -c 'import sys; assert sys.version_info >= (3, 8)' \
    || die "$PYTHON is not a Python >= 3.8"
log "python: $("$PYTHON" -c 'import sys; print(sys.executable, sys.version.split()[0])')"

# 1. torch + torchvision: keep a torch the user already has (e.g. a CUDA build).
if "$PYTHON" -c 'import torch' 2>/dev/null; then
    log "torch $(version torch) already installed: keeping it"
    if ! "$PYTHON" -c 'import torchvision' 2>/dev/null; then
        die "torch is installed but torchvision is missing or broken; install the torchvision release that matches torch $(version torch)"
    fi
elif [ "${MMDYN_TORCH_CPU:-auto}" != 0 ] && ! command -v nvidia-smi >/dev/null 2>&1; then
    # No NVIDIA GPU: the CPU build avoids the CUDA build's GBs of NVIDIA
    # libraries. Where the PyTorch index is not reachable, PyPI's build.
    log "no NVIDIA GPU found: trying the CPU build of torch from $TORCH_CPU_INDEX"
    if "$PYTHON" -m pip install --no-cache-dir --timeout 20 --retries 1 \
        --index-url "$TORCH_CPU_INDEX" "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"; then
        log "installed the CPU build of torch $TORCH_VERSION"
    else
        log "the CPU build is not available from $TORCH_CPU_INDEX: installing torch from PyPI"
        pip_install "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"
    fi
else
    pip_install "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"
fi
"$PYTHON" -c 'import torch, torchvision' || die "torch/torchvision do not import"

# 2. mmengine
if [ "$(version mmengine)" = "$MMENGINE_VERSION" ]; then
    log "mmengine $MMENGINE_VERSION already installed"
else
    pip_install "mmengine==$MMENGINE_VERSION"
fi

# 3. mmcv with compiled ops, built against the installed torch.
mmcv_ok() {
    [ "$(version mmcv)" = "$MMCV_VERSION" ] || return 1
    "$PYTHON" -c 'import mmcv.ops, mmcv._ext; from mmcv.ops import nms, roi_align' >/dev/null 2>&1
}

build_mmcv_from_source() {
    log "building mmcv $MMCV_VERSION with ops from source (12-20 min on 2 cores)"
    local work
    work=$(mktemp -d)
    # mmcv's setup.py imports pkg_resources, which setuptools >= 81 dropped.
    pip_install 'setuptools<81' wheel ninja
    log "fetching the mmcv $MMCV_VERSION source distribution"
    "$PYTHON" -m pip download --no-cache-dir --no-deps --no-binary=:all: \
        --no-build-isolation "mmcv==$MMCV_VERSION" -d "$work" \
        || die "could not download the mmcv $MMCV_VERSION source"
    tar -xzf "$work/mmcv-$MMCV_VERSION.tar.gz" -C "$work"
    # torch >= 2.10 headers refuse C++14/17; mmcv 2.1.0 asks for them.
    sed -i -e 's/-std=c++14/-std=c++20/g' -e 's/-std=c++17/-std=c++20/g' \
        "$work/mmcv-$MMCV_VERSION/setup.py"
    (cd "$work/mmcv-$MMCV_VERSION" && MMCV_WITH_OPS=1 MAX_JOBS=${MAX_JOBS:-$(nproc)} \
        "$PYTHON" -m pip install --no-cache-dir --no-build-isolation --no-deps -v . \
        > "$work/build.log" 2>&1) \
        || { tail -n 60 "$work/build.log" >&2; die "mmcv build failed (full log: $work/build.log)"; }
    log "mmcv built"
}

if mmcv_ok; then
    log "mmcv $MMCV_VERSION with ops already installed and importable beside torch $(version torch)"
else
    if [ -n "$(version mmcv)" ]; then
        log "removing mmcv $(version mmcv): wrong version or its ops do not load beside this torch"
        "$PYTHON" -m pip uninstall -y mmcv
    fi
    # mmcv's own requirements (opencv, addict, yapf, ...) from PyPI.
    pip_install addict 'numpy' packaging Pillow pyyaml yapf opencv-python
    if [ "${MMDYN_FORCE_MMCV_BUILD:-0}" != 1 ] && \
        "$PYTHON" -m pip install --no-cache-dir --no-deps --only-binary=:all: "mmcv==$MMCV_VERSION" >/dev/null 2>&1; then
        if mmcv_ok; then
            log "mmcv $MMCV_VERSION installed from a prebuilt wheel"
        else
            log "the prebuilt mmcv wheel does not load beside torch $(version torch): building instead"
            "$PYTHON" -m pip uninstall -y mmcv
            build_mmcv_from_source
        fi
    else
        log "no prebuilt mmcv $MMCV_VERSION wheel found (PIP_FIND_LINKS='${PIP_FIND_LINKS:-}')"
        build_mmcv_from_source
    fi
    mmcv_ok || die "mmcv $MMCV_VERSION is installed but its compiled ops do not import"
fi

# 4. pkg_resources: setuptools >= 81 dropped it, and mmengine 0.10.7 still
# imports it to resolve `mmdet::`/`mmpretrain::` config bases (mmdyn.engine
# patches that too, but plain mmengine scripts need it).
if "$PYTHON" -c 'import pkg_resources' >/dev/null 2>&1; then
    log "pkg_resources available (setuptools $(version setuptools))"
else
    pip_install 'setuptools<81'
fi

# 5. mmdet, mmpretrain and the test tools.
need=()
[ "$(version mmdet)" = "$MMDET_VERSION" ] || need+=("mmdet==$MMDET_VERSION")
[ "$(version mmpretrain)" = "$MMPRETRAIN_VERSION" ] || need+=("mmpretrain==$MMPRETRAIN_VERSION")
for pkg in pytest onnx onnxruntime onnxscript; do
    [ -n "$(version $pkg)" ] || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
    pip_install "${need[@]}" "mmcv==$MMCV_VERSION"
else
    log "mmdet $MMDET_VERSION, mmpretrain $MMPRETRAIN_VERSION, pytest, onnx, onnxruntime, onnxscript already installed"
fi

# 6. mmdyn itself, editable.
# From /, so that the checkout (the current directory) cannot shadow a
# missing install.
# The editable install also links configs/ and model-index.yml into
# mmdyn/.mim (git-ignored), where `mmdyn::` config bases are looked up: a
# checkout without them is installed again.
if (cd / && "$PYTHON" -c "import os, sys, mmdyn; sys.exit(0 if os.path.dirname(os.path.dirname(os.path.abspath(mmdyn.__file__))) == sys.argv[1] else 1)" "$ROOT") 2>/dev/null \
    && [ -e "$ROOT/mmdyn/.mim/configs" ] && [ -e "$ROOT/mmdyn/.mim/model-index.yml" ]
then
    log "mmdyn already installed in editable mode from $ROOT"
else
    pip_install --no-deps --no-build-isolation -e "$ROOT"
fi

log "checking the stack"
(cd / && "$PYTHON" -) <<'EOF' || die "the installed stack does not import"
import torch, torchvision, mmengine, mmcv, mmdet, mmpretrain
import mmcv.ops
import mmdyn.models, mmdyn.engine
print(f'[mmdyn install] torch {torch.__version__}, torchvision {torchvision.__version__}, '
      f'mmengine {mmengine.__version__}, mmcv {mmcv.__version__}, mmdet {mmdet.__version__}, '
      f'mmpretrain {mmpretrain.__version__}, mmdyn {__import__("mmdyn").__version__}')
EOF
log "done"
