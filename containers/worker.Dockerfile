# The self-hosted worker: `broker worker serve` on your own GPU (Kubernetes, ECS, a box under the desk).
#
# Built on the shared base image (containers/base.Dockerfile: CUDA runtime, Python, torch and the
# broker[local] engines), so every provider's image runs the same engines:
#   docker build -f containers/base.Dockerfile -t broker-base .
#   docker build -f containers/worker.Dockerfile [--build-arg EXTRA_PIP="my-engine==1.0"] -t broker-worker .
# Run it (the key comes from the environment, never from the command line):
#   docker run --gpus all -p 8000:8000 -e BROKER_WORKER_API_KEY=… -v "$PWD/avatars:/avatars:ro" broker-worker
# Probes: GET /health (liveness), GET /ready (readiness: 200 once the engines are loaded).
ARG BASE_IMAGE=broker-base
FROM ${BASE_IMAGE}

WORKDIR /opt/broker
COPY pyproject.toml README.md ./
COPY broker ./broker
# The base holds the heavy engine dependencies; this layer adds the server and this checkout's broker.
RUN python -m pip install --no-cache-dir ".[worker]" && mkdir -p /avatars

# Your own engines (packages with a `broker.engines` entry point), here too without rebuilding the base, e.g.
#   --build-arg EXTRA_PIP="my-tts==1.2 git+https://github.com/me/my-engine"
# torch is already installed: a plugin that pins another torch would replace the CUDA build.
ARG EXTRA_PIP=
RUN if [ -n "${EXTRA_PIP}" ]; then pip install ${EXTRA_PIP}; fi \
    && python -c "from broker import engines; print('engines:', ', '.join(engines.available()))"

ENV PYTHONUNBUFFERED=1
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"

ENTRYPOINT ["broker", "worker", "serve", "--host", "0.0.0.0", "--port", "8000"]
CMD ["--avatars", "/avatars", "--max-body-mb", "64"]
