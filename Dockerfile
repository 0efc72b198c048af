# The NATS ⇄ WebSocket bridge.  Build: docker build -t nats-ws-bridge .
# Run:   docker run -p 127.0.0.1:5001:5001 --memory 256m -e CONTROL_TOKENS="$(openssl rand -hex 32)"
#            -e NATS_URL=nats://host.docker.internal:4222 nats-ws-bridge    (one line)
# (Loopback only until AUTH_TOKENS or JWT is set: without them anyone who reaches the
# port may subscribe; without CONTROL_TOKENS, anyone may use the control API.)
# Every setting is an env var (see docs/operations.md); docker-compose.yml wires a NATS server too.

# --- build: the runtime dependencies, in a virtualenv ------------------------
FROM python:3.11-slim AS build

# panini pins ujson==5.4.0, which has no wheel for Python 3.11: pip compiles it
# (C and C++), so this stage has a compiler.  The final image does not.
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv

# Runtime dependencies only, in their own layer: rebuilt only when
# requirements.txt changes, not on every code edit.
COPY requirements.txt /tmp/requirements.txt
RUN /opt/venv/bin/pip install -r /tmp/requirements.txt

# --- the image ---------------------------------------------------------------
FROM python:3.11-slim

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HTTP_HOST=0.0.0.0 \
    HTTP_PORT=5001

# A fixed, numeric, unprivileged user, so `runAsNonRoot` policies can verify it.
RUN groupadd --system --gid 10001 bridge \
    && useradd --system --uid 10001 --gid bridge --no-create-home --shell /usr/sbin/nologin bridge

COPY --from=build /opt/venv /opt/venv

WORKDIR /app

# The code (main.py and handler.py, the bridge package) and the page, owned by
# root and read-only to the service user; and the demo service the compose files run
# from this image (`python services/demo_service.py`), a few lines of Panini.
COPY main.py handler.py ./
COPY bridge/ ./bridge/
COPY static/ ./static/
COPY services/ ./services/

USER 10001:10001

EXPOSE 5001

# slim has no curl: ask /healthz with the standard library (non-2xx or no answer: exit 1).
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('HTTP_PORT', '5001') + '/healthz', timeout=4)"]

# Exec form: python is PID 1 and receives SIGTERM itself (graceful shutdown:
# clients get 1001, NATS is drained).
CMD ["python", "main.py"]
