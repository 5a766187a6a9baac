# syntax=docker/dockerfile:1
# llm-energy-sidecar: per-request GPU energy and carbon accounting beside an LLM server.
#   docker build -t llm-energy-sidecar:0.1.0 .
#   docker run --rm -p 8080:8080 -p 9400:9400 llm-energy-sidecar:0.1.0 \
#     run --power-source simulated --upstream http://host.docker.internal:8000
#
# Two stages: the builder turns the source into a wheel; the final stage installs only
# that wheel (and its dependencies, all shipped as binary wheels) into a virtual
# environment, so no compiler, build backend or source tree reaches the image.
#
# tests/test_dockerfile.py reads the final stage's ARG, ENV, COPY and RUN lines from this
# file and performs them in a temporary virtual environment, so keep image paths in the
# ARG/ENV variables below (the test points them at temporary directories) and keep the
# install steps plain shell.

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS builder
WORKDIR /src
RUN python -m pip install --no-cache-dir --disable-pip-version-check "build>=1.2,<2"
COPY pyproject.toml README.md ./
COPY sidecar ./sidecar
RUN python -m build --wheel --outdir /dist

FROM ${PYTHON_IMAGE}
ARG PYTHON_IMAGE
ARG VERSION=0.1.0
# Where the builder's wheel is copied to, and removed from, during the install.
ARG WHEELHOUSE=/tmp/wheels
LABEL org.opencontainers.image.title="llm-energy-sidecar" \
      org.opencontainers.image.description="Per-request GPU energy and carbon accounting sidecar for LLM inference servers, exported as Prometheus metrics." \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${PYTHON_IMAGE}"
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/llm-energy-sidecar
ENV PATH="${VIRTUAL_ENV}/bin:${PATH}"
COPY --from=builder /dist/ ${WHEELHOUSE}/
RUN python -m venv "${VIRTUAL_ENV}" \
 && "${VIRTUAL_ENV}/bin/python" -m pip install --no-cache-dir --only-binary=:all: "${WHEELHOUSE}"/*.whl \
 && rm -rf "${WHEELHOUSE}"
# Numeric, so Kubernetes' runAsNonRoot can check it without a passwd lookup.
USER 65532:65532
# 8080: the proxy in front of the model server; 9400: /metrics, /healthz, /readyz, /summary.
EXPOSE 8080 9400
ENTRYPOINT ["llm-energy-sidecar"]
CMD ["run"]
