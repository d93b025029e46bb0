#!/usr/bin/env bash
# The command the GPU machine runs (through the device tool, with `.wheels` carried):
#   bash bench/run_on_device.sh tests            # the GPU faithfulness tests (pytest tests/gpu)
#   bash bench/run_on_device.sh bench ARGS...    # bench/harness.py ARGS (writes JSON under $OUT)
# Installs the carried wheels into /tmp/site first; torch comes from the machine's image.
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .wheels/*.whl
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
for module in numba imageio_ffmpeg; do
  python3 -c "import $module" 2>/dev/null || { cp -r "bench/device_shims/$module" /tmp/site/; echo "shim: $module"; }
done
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
echo "ffmpeg: $(command -v ffmpeg || echo none); disk: $(df -h /root | tail -1 | awk '{print $4}') free"
case "${1:-}" in
  tests) shift; python3 -m pytest -q -p no:cacheprovider tests/gpu "$@" ;;
  bench) shift; python3 bench/harness.py "$@" ;;
  *) echo "usage: bash bench/run_on_device.sh tests|bench [args]" >&2; exit 2 ;;
esac
