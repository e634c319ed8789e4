#!/usr/bin/env bash
# GPU checks on a CUDA machine, in one go (issue 6): the GPU tests (CUDA against CPU for every
# torch kernel, and the quick demo on a dask-cuda cluster against a CPU run), the kernel benchmark
# (benchmarks/bench_gpu.py) and `cryodask demo --cluster cuda`, timed. Logs and JSON go to OUTDIR.
#
#     bash benchmarks/gpu_check.sh OUTDIR [tests,bench,demo,scaling]
#
# cryodask must be importable (pip install -e ".[gpu]", or PYTHONPATH=. with the dependencies
# present). A folder .whl/ of wheels, if present, is installed first into /tmp/site: for a GPU
# machine without package-index access that already has torch, numpy, scipy, pandas, scikit-image
# and OpenCV, download the rest on a machine with access, for that machine's Python, e.g.
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
#       --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl dask==2026.7.1 \
#       distributed==2026.7.1 'dask-cuda==26.10.*' zarr numcodecs donfig google-crc32c mrcfile starfile \
#       finufft tornado tblib zict locket partd xarray
# "scaling" also runs benchmarks/bench_scaling.py --n 50 with every kernel on the CPU.
set -uo pipefail
OUTDIR=${1:-gpu_check}
WHAT=${2:-tests,bench,demo}
mkdir -p "$OUTDIR"
export PYTHONUNBUFFERED=1
T0=$SECONDS
step() { echo "=== [gpu_check +$((SECONDS - T0)) s] $*"; }
PY=${PYTHON:-python3}

if [ -d .whl ]; then
    step "installing carried wheels into /tmp/site"
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 3
    export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
fi

step "environment"
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    nproc
    $PY - <<'EOF'
import importlib
for m in ("torch", "numpy", "dask", "distributed", "dask_cuda", "zarr", "xarray", "skimage", "cv2", "scipy"):
    try:
        mod = importlib.import_module(m)
        print(m, getattr(mod, "__version__", "?"))
    except Exception as e:
        print(m, "IMPORT FAILED", type(e).__name__, e)
import torch
print("cuda available", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
EOF
} 2>&1 | tee "$OUTDIR/env.txt"

if [[ $WHAT == *tests* ]]; then
    step "GPU tests"
    $PY -m pytest -q -o addopts="" -p no:cacheprovider -m gpu -s tests/test_gpu.py tests/test_projection.py \
        2>&1 | tee "$OUTDIR/pytest_gpu.log"
fi

if [[ $WHAT == *bench* ]]; then
    step "kernel benchmark"
    $PY benchmarks/bench_gpu.py --repeat 1 --n-backproject 2000 --json "$OUTDIR/bench_gpu.json" 2>&1 \
        | tee "$OUTDIR/bench_gpu.log"
fi

if [[ $WHAT == *demo* ]]; then
    step "cryodask demo --cluster cuda"
    rm -rf /tmp/gpu_demo
    { time $PY -m cryodask demo --cluster cuda --out /tmp/gpu_demo ; } > "$OUTDIR/demo_cuda.log" 2>&1
    tail -25 "$OUTDIR/demo_cuda.log"
    cp /tmp/gpu_demo/report.json "$OUTDIR/demo_cuda_report.json" 2>/dev/null
fi

if [[ $WHAT == *scaling* ]]; then
    step "scaling benchmark, 50 micrographs, kernels on the CPU"
    CRYODASK_DEVICE=cpu $PY benchmarks/bench_scaling.py --n 50 --work /tmp/bench_scaling 2>&1 \
        | tee "$OUTDIR/bench_scaling.log"
fi
step "done"
