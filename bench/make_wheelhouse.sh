#!/usr/bin/env bash
# Wheels the GPU machine lacks, for its Python 3.12 (see ../shared/device-notes.md), into .wheels/
# (git-ignored; the device tool carries it). torch/torchvision/transformers come from the image.
# llvmlite (60 MB), imageio-ffmpeg (68 MB) and decord (14 MB) would crowd out the rest of a run's
# 64 MiB: bench/device_shims stands in for numba, imageio_ffmpeg and decord there when the image
# lacks them (an ffmpeg binary can travel xz-compressed as .ffmpeg/ffmpeg.xz, see
# run_on_device.sh). boto3 lets the benchmarks start the worker as handler.py does. fa3-fwd is
# FlashAttention-3 (attention.py).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .wheels
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux2010_x86_64 \
  --platform manylinux1_x86_64 -d .wheels \
  diffusers==0.42.1 wan22==2.2.11 librosa==0.11.0 soxr==1.1.0 soundfile==0.14.0 cffi==2.1.1 \
  pycparser==3.12 audioread==3.1.0 pooch==1.9.0 platformdirs==4.14.8 decorator==5.3.1 \
  lazy_loader==0.6 msgpack==1.2.4 easydict==1.14 ftfy==6.3.1 wcwidth==0.9.4 imageio==2.38.1 \
  fa3-fwd==0.0.3 \
  boto3==1.44.8 botocore==1.44.8 s3transfer==0.19.3 jmespath==1.1.0 python-dateutil==2.9.0.post0
du -sh .wheels
