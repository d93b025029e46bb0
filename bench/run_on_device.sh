#!/usr/bin/env bash
# The command the GPU machine runs (through the device tool, with `.wheels` carried):
#   bash bench/run_on_device.sh tests            # the GPU faithfulness tests (pytest tests/gpu)
#   bash bench/run_on_device.sh bench ARGS...    # python -m bench.harness ARGS (JSON under $OUT)
# Installs the carried wheels into /tmp/site first; torch comes from the machine's image.
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .wheels/*.whl
# The worker's package from src/ and the bench/builder packages from the root, as an install would.
export PYTHONPATH=/tmp/site:$PWD/src:$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
if [ -f .ffmpeg/ffmpeg.xz ]; then  # a carried static ffmpeg (the image has none)
  mkdir -p /tmp/bin && python3 -c "import lzma, shutil; shutil.copyfileobj(lzma.open('.ffmpeg/ffmpeg.xz'), open('/tmp/bin/ffmpeg', 'wb'))"
  chmod +x /tmp/bin/ffmpeg && export PATH=/tmp/bin:$PATH IMAGEIO_FFMPEG_EXE=/tmp/bin/ffmpeg
fi
# Stand-ins (bench/stand_ins/<module>_stand_in.py) for what a run cannot carry: each goes into
# /tmp/site under the real module name, here only and only when the image lacks that module.
for stand_in in bench/stand_ins/*_stand_in.py; do
  module=$(basename "$stand_in" _stand_in.py)
  python3 -c "import $module" 2>/dev/null || {
    mkdir -p "/tmp/site/$module" && cp "$stand_in" "/tmp/site/$module/__init__.py"
    echo "stand-in: $module"
  }
done
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
echo "ffmpeg: $(command -v ffmpeg || echo none); disk: $(df -h /root | tail -1 | awk '{print $4}') free"
case "${1:-}" in
  tests) shift; python3 -m pytest -q -p no:cacheprovider tests/gpu "$@" ;;
  bench) shift; python3 -m bench.harness "$@" ;;
  *) echo "usage: bash bench/run_on_device.sh tests|bench [args]" >&2; exit 2 ;;
esac
