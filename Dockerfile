# syntax=docker/dockerfile:1
#
# One image for every inkling process: `inkling serve retrieval|ranking|events` and
# `inkling worker` (deploy/k8s runs each as its own Deployment from this image).
#
# NOT BUILT. This file was written on a machine without Docker: it has never been
# built, scanned or run. Build it and smoke-test it before relying on it, e.g.
#   docker build -t inkling:dev .
#   docker run --rm inkling:dev --version
# tests/unit/test_k8s_manifests.py only reads it (the pins and the user below).
#
# What it holds, and what it does not:
# - CPU-only torch 2.13.0, installed first from PyTorch's CPU index so that resolving
#   the project's `torch==2.13.0` pin (pyproject.toml) finds it installed and never
#   pulls a CUDA build. The CPU wheel's version is 2.13.0+cpu, which that pin accepts.
# - The project and its dependencies in a virtualenv, copied into a slim runtime stage
#   without compilers.
# - feature_repo/ at /app/feature_repo, named by INKLING_FEATURE_REPO below: the package
#   is installed into site-packages, so inkling's default (a folder beside the package,
#   inkling/config.py) does not exist in the image. The data directory is not set here
#   but by the deployment's settings file (deploy/k8s: data_dir = "/data"), since an
#   environment variable baked into the image would silently win over that file.
# - NO data: the model registry, the event log, features and Feast's registry live under
#   the data directory, a volume at run time (deploy/k8s: the inkling-data claim at
#   /data). .dockerignore keeps data/ out of the build context as well.
# - No Java: the Spark jobs (`inkling features`, `embeddings`, `retrain`, ...) need
#   Java 17 and are not meant to run from this image. pyspark is installed all the same,
#   because pyproject.toml makes it a dependency of the package (the serving processes
#   never import it; tests/unit/test_layout.py checks that).

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# Compilers only here, for a dependency that has no wheel for the platform; the runtime
# stage below has none.
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install --upgrade pip \
    && pip install --index-url https://download.pytorch.org/whl/cpu "torch==2.13.0"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY inkling ./inkling
COPY batch ./batch
COPY bench ./bench
COPY demo ./demo
COPY ranking_server ./ranking_server
COPY retrieval_server ./retrieval_server
COPY events_server ./events_server
COPY stream_worker ./stream_worker
# Not editable: the image runs the installed package, not this folder.
RUN pip install . \
    && python -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__; assert torch.version.cuda is None, 'a CUDA build'" \
    && python -c "import inkling.cli, retrieval_server.app, ranking_server.app, events_server.app, stream_worker.app"

FROM ${PYTHON_IMAGE} AS runtime
# A fixed, non-root uid/gid: the Kubernetes manifests run as 10001 (runAsUser) and give
# the data volume to group 10001 (fsGroup).
RUN groupadd --system --gid 10001 inkling \
    && useradd --system --uid 10001 --gid 10001 --home-dir /home/inkling --create-home \
       --shell /usr/sbin/nologin inkling
COPY --from=build /opt/venv /opt/venv
COPY feature_repo /app/feature_repo
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    INKLING_FEATURE_REPO=/app/feature_repo
WORKDIR /app
# gRPC: retrieval, ranking, events. Prometheus /metrics: retrieval, ranking, events,
# worker (inkling/telemetry/providers.py, DEFAULT_METRICS_PORTS).
EXPOSE 50061 50062 50063 9461 9462 9463 9464
USER 10001:10001
ENTRYPOINT ["inkling"]
CMD ["--help"]
