# The RunPod serverless worker: handlers/runpod/handler.py on the shared GPU base.
#
#   docker build -f containers/base.Dockerfile -t broker-base:local .
#   docker build -f containers/runpod.Dockerfile --build-arg BASE_IMAGE=broker-base:local \
#       --build-arg BROKER_ENGINE=piper [--build-arg EXTRA_PIP="my-engine==1.0"] -t you/broker-runpod:0.1 .
#
# (`broker deploy runpod --image you/broker-runpod:0.1` runs both, pushes, and creates the endpoint.)
# Engine, voice and handler mode are build args baked in as environment variables; the endpoint's
# template env can override them without a rebuild.
ARG BASE_IMAGE=broker-base:local
FROM ${BASE_IMAGE}

COPY handlers/runpod/requirements.txt /app/requirements.txt
RUN pip install -r /app/requirements.txt

# Your own engines (packages with a `broker.engines` entry point), here too without rebuilding the base, e.g.
#   --build-arg EXTRA_PIP="my-tts==1.2 git+https://github.com/me/my-engine"
# torch is already installed: a plugin that pins another torch would replace the CUDA build.
ARG EXTRA_PIP=
RUN if [ -n "${EXTRA_PIP}" ]; then pip install ${EXTRA_PIP}; fi \
    && python -c "from broker import engines; print('engines:', ', '.join(engines.available()))"

# piper | csm | a plugin's name (csm also needs BROKER_ENGINES__CSM_PATH pointing at weights, e.g. on a
# network volume)
ARG BROKER_ENGINE=piper
# a Piper .onnx voice inside the container (e.g. /runpod-volume/voices/x.onnx); empty = the packaged voice
ARG BROKER_VOICE=
# stream: generator handler (speech streams to /stream) | job: plain handler
ARG BROKER_RUNPOD_MODE=stream
ENV BROKER_ENGINES__DEFAULT=${BROKER_ENGINE} \
    BROKER_ENGINES__PIPER_VOICE=${BROKER_VOICE} \
    BROKER_RUNPOD_MODE=${BROKER_RUNPOD_MODE}

WORKDIR /app
COPY handlers/runpod/handler.py handlers/runpod/test_input.json handlers/runpod/test_input_render.json /app/

CMD ["python", "-u", "/app/handler.py"]
