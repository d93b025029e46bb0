# syntax=docker/dockerfile:1
#
# RunPod serverless worker for Wan2.2-S2V-14B (speech-to-video).
#
#   docker build -t wan-s2v-worker .                                  # weights NOT in the image
#   docker build --build-arg BAKE_WEIGHTS=1 \
#       --secret id=hf_token,env=HF_TOKEN -t wan-s2v-worker:baked .   # weights baked in (~46 GB)
#
# By default the image holds no weights: the worker finds them in RunPod's cached model
# (/runpod-volume/huggingface-cache/hub/models--Wan-AI--Wan2.2-S2V-14B/snapshots/<rev>/), on a
# network volume, or in WAN_S2V_CKPT_DIR. BAKE_WEIGHTS=1 downloads them at build time with
# builder/download_weights.py; the optional Hugging Face token is a BuildKit secret, never a
# build argument, so it is in no layer and no image history.

# 0 (default): no weights in the image. 1: bake them in. Selects the stage "weights-<value>" below.
ARG BAKE_WEIGHTS=0

# ---------------------------------------------------------------------------------------------
# base: system packages and the pinned Python dependencies.
# CUDA 13.0 user space: PyPI's torch==2.14.1 wheel is the CUDA 13.0 build (+cu130), which needs a
# host driver >= 580 (hub.json's allowedCudaVersions asks RunPod for such hosts). Ubuntu 24.04
# ships Python 3.12, which every pinned package has wheels for.
FROM nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04 AS base

ARG DEBIAN_FRONTEND=noninteractive
# gcc, libc6-dev and python3-dev: torch.compile (WAN_S2V_COMPILE, on by default) has Triton build
# its small C launcher modules on the worker, against Python's headers.
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        ffmpeg \
        ca-certificates \
        python3 \
        python3-venv \
        python3-dev \
        gcc \
        libc6-dev \
    && rm -rf /var/lib/apt/lists/*

# Ubuntu's Python is "externally managed" (PEP 668): install into a virtual environment.
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY requirements.txt requirements-wan.txt /app/
RUN pip install -r requirements.txt
# The official Wan2.2 code, without its declared dependencies (they include flash_attn, which
# does not build here), and FlashAttention-3's forward on x86-64 (WAN_S2V_ATTENTION).
RUN pip install --no-deps -r requirements-wan.txt
# numba's compiled functions, built once here and found by every worker: librosa compiles them
# on its first use (15.5 s of a cold start measured on the GPU machine). NUMBA_CPU_NAME=generic
# makes the cache valid on whatever x86-64 CPU the worker lands on. The allocator's expandable
# segments keep fragmentation low, which the memory tiers (WAN_S2V_GPU_MEMORY_GB) count on.
# Two malloc arenas: with one per thread (the SDK's, the loaders') the worker's resident memory
# rose by 50-90 MB over its first 50 jobs before it levelled off, 200 MB higher (tests/test_handler.py).
ENV NUMBA_CACHE_DIR=/opt/numba-cache \
    NUMBA_CPU_NAME=generic \
    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True \
    MALLOC_ARENA_MAX=2
RUN python -c "import numpy, soundfile, librosa; \
soundfile.write('/tmp/warm.wav', numpy.zeros(16000, 'float32'), 16000); \
librosa.load('/tmp/warm.wav', sr=16000)" && rm /tmp/warm.wav

# ---------------------------------------------------------------------------------------------
# weights-0 / weights-1: without or with the checkpoint. BuildKit builds only the one selected by
# BAKE_WEIGHTS. They sit below the application code, so code changes never re-download 46 GB.
FROM base AS weights-0

FROM base AS weights-1
# Commit of Wan-AI/Wan2.2-S2V-14B to bake; keep equal to DEFAULT_REVISION in
# builder/download_weights.py (tests/test_packaging.py checks it).
ARG WAN_S2V_REVISION=dab4e9c55bbe4c8c4d03db1c2c98c7f0ac9c454b
COPY builder/download_weights.py /app/builder/download_weights.py
RUN --mount=type=secret,id=hf_token,required=false \
    python /app/builder/download_weights.py /models/Wan2.2-S2V-14B --revision "$WAN_S2V_REVISION"
ENV WAN_S2V_CKPT_DIR=/models/Wan2.2-S2V-14B

# ---------------------------------------------------------------------------------------------
# final: the worker.
FROM weights-${BAKE_WEIGHTS} AS final

# Weights are read from local folders only; nothing is fetched from the Hub at run time.
ENV HF_HUB_OFFLINE=1

WORKDIR /app
# The worker's package (its dependencies are installed above, from the same requirements.txt).
COPY pyproject.toml README.md /app/
COPY src/ /app/src/
RUN pip install --no-deps /app
COPY handler.py test_input.json /app/
COPY builder/ /app/builder/
# A tiny random-weight checkpoint (about 16 MB, seconds to write) for smoke tests on images without
# weights, such as the RunPod Hub's test run (.runpod/tests.json points WAN_S2V_CKPT_DIR at it).
# The worker never picks it by itself: its videos are noise.
RUN python /app/builder/make_tiny_checkpoint.py /opt/tiny-checkpoint

CMD ["python", "-u", "/app/handler.py"]
