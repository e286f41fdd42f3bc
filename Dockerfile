# syntax=docker/dockerfile:1
# scm-relay container image. Build: docker build -t scm-relay .
# The build stage installs from the same hash-pinned lock file as `make setup`, and
# builds the relay's wheel with a build backend pinned by hash (requirements/build.lock)
# in a venv of its own, so nothing of the build reaches the runtime image.
ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim-bookworm AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
RUN python -m venv /opt/scm-relay
COPY requirements/runtime.lock requirements/runtime.lock
RUN /opt/scm-relay/bin/pip install --require-hashes --no-deps -r requirements/runtime.lock
COPY requirements/build.lock requirements/build.lock
RUN python -m venv /opt/build \
 && /opt/build/bin/pip install --require-hashes --no-deps -r requirements/build.lock
COPY pyproject.toml README.md ./
COPY service service
# The last use of the environment's pip: the runtime image gets no installer (pip,
# setuptools, wheel) to fetch or build code with.
RUN /opt/build/bin/pip wheel --no-deps --no-build-isolation -w /tmp/wheel . \
 && /opt/scm-relay/bin/pip install --no-deps /tmp/wheel/*.whl \
 && /opt/scm-relay/bin/python -m pip uninstall --yes pip setuptools wheel

# What the relay's image and the compose stack's simulator image share.
FROM python:${PYTHON_VERSION}-slim-bookworm AS base
ARG VERSION=0.1.0
ARG SOURCE_URL=""
LABEL org.opencontainers.image.title="scm-relay" \
      org.opencontainers.image.description="Relays SCM-change events from Kafka to the Scantrust async SCM upload API" \
      org.opencontainers.image.source="${SOURCE_URL}" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
# The base image's own installer goes too, with the bundled copy ensurepip would restore.
RUN groupadd --system --gid 10001 relay \
 && useradd --system --uid 10001 --gid relay --no-create-home --shell /usr/sbin/nologin relay \
 && python -m pip uninstall --yes pip setuptools wheel \
 && rm -rf /usr/local/lib/python*/ensurepip
COPY --from=build /opt/scm-relay /opt/scm-relay
# Nothing is written at run time; Python's bytecode cache is off so a read-only root works.
ENV PATH=/opt/scm-relay/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    SCM_RELAY_HTTP_PORT=8080 \
    SCM_RELAY_LOG_FORMAT=json
USER 10001:10001
ENTRYPOINT ["scm-relay"]

# The API simulator for deploy/compose.yaml only (docker build --target simulator): the
# wheel holds no development kit, so the kit's simulator (and the package file it sits
# in, nothing else of the kit) is copied in beside the relay's package.
FROM base AS simulator
ARG PYTHON_VERSION
COPY devkit/__init__.py /opt/scm-relay/lib/python${PYTHON_VERSION}/site-packages/devkit/__init__.py
COPY devkit/simulator /opt/scm-relay/lib/python${PYTHON_VERSION}/site-packages/devkit/simulator
EXPOSE 8000
CMD ["simulator", "--host", "0.0.0.0", "--port", "8000"]

# The relay's image, the default target: the relay and the operator tools, nothing else.
FROM base AS runtime
EXPOSE 8080
# Standard library only: the image carries no curl or wget.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('SCM_RELAY_HTTP_PORT', '8080'), timeout=4)"]
# The relay is PID 1 in exec form: SIGTERM reaches it directly and it drains (flush,
# wait for uploads, commit) before exiting.
STOPSIGNAL SIGTERM
CMD ["run"]
