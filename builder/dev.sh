#!/usr/bin/env bash
# Local development from a fresh clone (Linux, Python 3.11+, no GPU needed):
#   bash builder/dev.sh demo   set up, then run handler.py on test_input.json and print the result
#   bash builder/dev.sh test   set up, then run the test suite (what CI runs)
# Set-up: a virtualenv in .venv with the pinned dependencies, the official Wan2.2 code and
# FlashAttention-3 (--no-deps), the worker's package (editable), and ffmpeg/ffprobe from the system
# packages when missing (the tests read videos with ffprobe).
# `demo` builds a tiny random-weight checkpoint in checkpoints/tiny when WAN_S2V_CKPT_DIR is unset:
# its videos are noise, but every stage of the worker runs for real.
set -euo pipefail
cd "$(dirname "$0")/.."

setup() {
  if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
  fi
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -r requirements-dev.txt
  .venv/bin/python -m pip install -q --no-deps -r requirements-wan.txt
  # The worker's package, editable: src/ changes take effect without reinstalling.
  .venv/bin/python -m pip install -q --no-deps -e .
  if ! command -v ffprobe >/dev/null; then
    if [ "$(id -u)" = 0 ]; then
      apt-get update -qq && apt-get install -y -qq --no-install-recommends ffmpeg >/dev/null
    else
      echo "ffprobe is missing: install ffmpeg (e.g. sudo apt-get install ffmpeg)" >&2
      exit 1
    fi
  fi
}

demo() {
  if [ -z "${WAN_S2V_CKPT_DIR:-}" ]; then
    .venv/bin/python builder/make_tiny_checkpoint.py checkpoints/tiny
    export WAN_S2V_CKPT_DIR="$PWD/checkpoints/tiny"
  fi
  # Without a bucket the video would come back as base64 inside the printed result; the demo keeps
  # it as a file instead, in outputs/ standing in for the network volume.
  mkdir -p outputs
  export NETWORK_VOLUME_DIR="${NETWORK_VOLUME_DIR:-$PWD/outputs}"
  export MAX_INLINE_VIDEO_BYTES="${MAX_INLINE_VIDEO_BYTES:-1}"
  .venv/bin/python handler.py "$@"
}

run_tests() {
  # Two test processes, a test file each at a time (a file's module fixtures, such as its API
  # server, are built once): on CPU each process runs torch on one thread (tests/conftest.py), so
  # two keep a 2-core machine busy. At 4815b88 the suite took 295 s in one process, 199 s in two.
  .venv/bin/python -m pytest -q -n 2 --dist loadfile tests "$@"
}

case "${1:-}" in
  demo) shift; setup; demo "$@" ;;
  test) shift; setup; run_tests "$@" ;;
  *) echo "usage: bash builder/dev.sh demo|test [args]" >&2; exit 2 ;;
esac
