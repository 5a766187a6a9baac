# syntax=docker/dockerfile:1
# llm-energy-sidecar: per-request GPU energy and carbon accounting beside an LLM server.
#   docker build -t llm-energy-sidecar:0.1.0 .
#   docker run --rm -p 8080:8080 -p 9400:9400 llm-energy-sidecar:0.1.0 \
#     run --power-source simulated --upstream http://host.docker.internal:8000
# Pin the base by digest (the same for every platform of a multi-arch manifest):
#   docker build --build-arg PYTHON_IMAGE=python:3.11-slim@sha256:<digest> ...
#
# Two stages. The builder turns the source into a wheel and installs it, with its
# dependencies (binary wheels only, never an sdist compiled here), into a virtual
# environment made without pip or setuptools; the base's own pip does the installing.
# The final stage copies only that environment, so no compiler, build backend, wheel
# file or source tree reaches the image. Nothing here names an architecture:
# `docker buildx build --platform linux/amd64,linux/arm64` builds each platform on its
# own base and its own wheels. tests/test_image.py builds and runs this file for real.

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS builder
# Optional extras of the package, comma separated: EXTRAS=report adds matplotlib for
# `llm-energy-sidecar report` (about 165 MiB more; the default image leaves it out).
ARG EXTRAS=
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/llm-energy-sidecar
WORKDIR /src
COPY pyproject.toml README.md ./
COPY sidecar ./sidecar
RUN python -m pip wheel --no-deps --wheel-dir /dist . \
 && python -m venv --without-pip "${VIRTUAL_ENV}" \
 && python -m pip --python "${VIRTUAL_ENV}/bin/python" install --only-binary=:all: \
      "$(echo /dist/*.whl)${EXTRAS:+[${EXTRAS}]}"

FROM ${PYTHON_IMAGE}
ARG PYTHON_IMAGE
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="llm-energy-sidecar" \
      org.opencontainers.image.description="Per-request GPU energy and carbon accounting sidecar for LLM inference servers, exported as Prometheus metrics." \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${PYTHON_IMAGE}"
# The root is read-only in Kubernetes: the bytecode pip compiled in the builder is all
# Python gets, and it must not try to write more.
# MPLCONFIGDIR: matplotlib's cache in the writable /tmp, for an EXTRAS=report build.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    MPLCONFIGDIR=/tmp/matplotlib \
    VIRTUAL_ENV=/opt/llm-energy-sidecar
ENV PATH="${VIRTUAL_ENV}/bin:${PATH}"
# Owned by root, so the process (below) cannot change its own code.
COPY --from=builder ${VIRTUAL_ENV} ${VIRTUAL_ENV}
# Numeric, so Kubernetes' runAsNonRoot can check it without a passwd lookup.
USER 65532:65532
# 8080: the proxy in front of the model server; 9400: /metrics, /healthz, /readyz, /summary.
EXPOSE 8080 9400
ENTRYPOINT ["llm-energy-sidecar"]
CMD ["run"]
