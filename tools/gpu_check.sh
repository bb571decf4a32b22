#!/usr/bin/env bash
# One-call GPU verification: CUDA and Triton tests, GPU benchmarks, one
# Markdown report (OUTDIR/gpu_report.md) within 8 minutes of wall time.
#
#   tools/gpu_check.sh OUTDIR [--dry-run] [--budget SECONDS]
#
# Needs a CUDA GPU, torch, pytest (and torchvision for the network
# benchmarks); installs this checkout beside the preinstalled torch with
# `pip install -e . --no-deps` (no network needed) and runs
# tools/gpu_check.py. Without a GPU it prints one line and exits 2.
# --dry-run runs the pipeline on CPU with tiny shapes (no install).
# PYTHON selects the interpreter (default python3).
set -u
if [ $# -lt 1 ] || [ "${1#-}" != "$1" ]; then
    echo "usage: tools/gpu_check.sh OUTDIR [--dry-run] [--budget SECONDS]" >&2
    exit 2
fi
out_dir=$1
shift
root=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-python3}
GPU_CHECK_START=$(date +%s)
export GPU_CHECK_START
dry_run=0
for arg in "$@"; do
    [ "$arg" = --dry-run ] && dry_run=1
done
if [ "$dry_run" = 0 ] && ! "$py" -c \
    'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' \
    >/dev/null 2>&1; then
    echo "gpu_check: no CUDA GPU visible (torch.cuda.is_available() is False); nothing was run" >&2
    exit 2
fi
mkdir -p "$out_dir" || exit 2
out_dir=$(cd "$out_dir" && pwd)
cd "$root" || exit 2
if [ "$dry_run" = 0 ]; then
    start=$(date +%s)
    if "$py" -m pip install -q -e . --no-deps --no-build-isolation \
        >"$out_dir/install.log" 2>&1; then
        echo "pip install -e . --no-deps: ok in $(($(date +%s) - start)) s" \
            >>"$out_dir/install.log"
    else
        echo "pip install -e . --no-deps failed (above); running from the source tree on PYTHONPATH" \
            >>"$out_dir/install.log"
    fi
fi
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
exec "$py" "$root/tools/gpu_check.py" "$out_dir" "$@"
