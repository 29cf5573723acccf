# Shared GPU base for every broker worker image: CUDA runtime, a pinned CUDA build of torch,
# and broker with its [local] engines. Provider images (runpod.Dockerfile, ...) build on it.
#
#   docker build -f containers/base.Dockerfile -t broker-base:local .
#
# Build from the repository root (the context must hold pyproject.toml and broker/).
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
FROM ${CUDA_IMAGE}

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# libsndfile for soundfile (WAV/FLAC), libgl/glib for OpenCV; PyAV wheels bundle their own FFmpeg.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-pip ca-certificates \
        libsndfile1 libgl1 libglib2.0-0 \
    && rm -rf /var/lib/apt/lists/*

RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# torch first, from the CUDA wheel index, at the version broker[local] pins; pip then keeps it
# (a CPU wheel from PyPI would otherwise satisfy the pin and silently lose the GPU).
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

WORKDIR /opt/broker
COPY pyproject.toml README.md ./
COPY broker ./broker
RUN pip install ".[local]"

# Your own engines (packages with a `broker.engines` entry point) and what they need, e.g.
#   --build-arg EXTRA_PIP="my-tts==1.2 git+https://github.com/me/my-engine"
# torch is already installed: a plugin that pins another torch would replace the CUDA build.
ARG EXTRA_PIP=
RUN if [ -n "${EXTRA_PIP}" ]; then pip install ${EXTRA_PIP}; fi \
    && python -c "from broker import engines; print('engines:', ', '.join(engines.available()))"

# Fail the build, not the first job, if the engines cannot load.
RUN python -c "from broker import engines; engines.configure(device='cpu'); engines.speech_engine('piper')"
