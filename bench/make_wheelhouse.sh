#!/usr/bin/env bash
# Wheels the GPU machine lacks, for its Python 3.12 (see ../shared/device-notes.md), into .wheels/
# (git-ignored; the device tool carries it). The list comes from the project's pins
# (requirements.txt, requirements-wan.txt) through bench/wheelhouse.py, less what the machine's image
# provides (torch, torchvision, transformers, ...), what bench/stand_ins stands in for (numba,
# imageio-ffmpeg, decord: their wheels would crowd out the rest of a run's 64 MiB; an ffmpeg binary
# can travel xz-compressed as .ffmpeg/ffmpeg.xz, see run_on_device.sh) and what a run does not use
# (runpod, ...), plus the runtime dependencies the image lacks (wheelhouse.py's EXTRA).
# botocore is carried with the s3 and sts models only (1 MB instead of 17 MB).
# tests/test_bench_wheelhouse.py checks that list against the pins.
set -euo pipefail
cd "$(dirname "$0")/.."
listed=$(python3 bench/wheelhouse.py)  # fails the script when a requirement is not pinned
mapfile -t wheels <<< "$listed"
mkdir -p .wheels
python3 bench/wheelhouse.py --prune .wheels  # wheels of an older list would be installed too
download=(python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12
  --implementation cp
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux2010_x86_64
  --platform manylinux1_x86_64 -d .wheels "${wheels[@]}")
echo "${download[*]}"
"${download[@]}"
python3 bench/wheelhouse.py --slim .wheels  # botocore without the models of services the worker never calls
du -sh .wheels
