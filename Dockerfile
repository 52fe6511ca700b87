# One image for every role: the producer API (the default command), the workers and the
# one-shot migration. What it installs is pinned, with hashes, in requirements.lock; regenerate
# that file with the command at its top after changing the dependencies in pyproject.toml.
FROM python:3.11-slim
# Byte code is compiled as pip installs (the unprivileged user could not write it later).
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
# The locked dependencies first, in their own layer: a code change does not reinstall them.
COPY requirements.lock ./
RUN pip install --require-hashes -r requirements.lock
COPY pyproject.toml MANIFEST.in README.md CHANGELOG.md ./
COPY worker ./worker
COPY producer ./producer
COPY appattest ./appattest
# The client's package: the server's wire models are defined there.
COPY clients/python/src ./clients/python/src
# The project itself, without resolving anything again; pip check proves the lock covers it.
RUN pip install --no-deps . && pip check
# An unprivileged user with a fixed numeric id, so that "run as non-root" policies can check it.
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin appattest
USER 10001:10001
EXPOSE 8000
# Liveness of the default command (the API); compose gives the worker a check of its own.
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=3)"]
CMD ["appattest", "api", "--host", "0.0.0.0", "--port", "8000"]
