# syntax=docker/dockerfile:1
# The caption worker and the viewer server (`captions worker`, `captions web`) in one image.
#
#   docker build -t kyutai-livekit-captions .
#   docker compose up            (see docker-compose.yml and README.md (Deployment))
#
# Reproducible: Python packages come only from uv.lock (`uv sync --frozen`), the viewer's JavaScript
# only from web/package-lock.json (`npm ci`). The model is NOT in the image: it is downloaded once
# into HF_HOME, a volume, on the first start (or mounted as a local checkpoint directory).

ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
ARG NODE_IMAGE=node:22-bookworm-slim
# uv: the version that wrote uv.lock (0.13.9).
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.13.9

# ---- viewer assets: livekit-client from the npm lock file --------------------------------------------
FROM ${NODE_IMAGE} AS web
WORKDIR /app/web
COPY web/package.json web/package-lock.json ./
RUN npm ci --omit=dev --no-audit --no-fund --loglevel=error

FROM ${UV_IMAGE} AS uv

# ---- runtime: CUDA base, Python from Ubuntu, dependencies from uv.lock ----------------------------------
FROM ${CUDA_IMAGE}
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=uv /uv /uvx /usr/local/bin/

# Non-root: the processes never need root, and the volumes are owned by this user.
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin captions \
    && mkdir -p /app /data/hf-cache /data/transcripts \
    && chown -R captions:captions /app /data
WORKDIR /app
USER captions

# The system Python (3.12 on Ubuntu 24.04); uv must not download another one.
ENV UV_PYTHON=/usr/bin/python3 \
    UV_PYTHON_DOWNLOADS=never \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PROJECT_ENVIRONMENT=/app/.venv

# Dependencies first (a layer that only changes with uv.lock), then the project itself.
COPY --chown=captions:captions pyproject.toml uv.lock README.md ./
RUN --mount=type=cache,target=/home/captions/.cache/uv,uid=10001,gid=10001 \
    uv sync --frozen --no-dev --no-install-project
# The product only: .dockerignore leaves out captions/dev and captions/bench (tools it never imports).
COPY --chown=captions:captions captions ./captions
COPY --chown=captions:captions web ./web
COPY --from=web --chown=captions:captions /app/web/node_modules ./web/node_modules
RUN --mount=type=cache,target=/home/captions/.cache/uv,uid=10001,gid=10001 \
    uv sync --frozen --no-dev

ENV PATH=/app/.venv/bin:$PATH \
    PYTHONUNBUFFERED=1
# Hugging Face cache (model weights) and transcripts live in volumes, never in the image.
ENV HF_HOME=/data/hf-cache \
    CAPTIONS_DATA_DIR=/data/transcripts
# Inside a container the probes and the viewer must listen beyond loopback.
ENV CAPTIONS_METRICS_HOST=0.0.0.0 \
    CAPTIONS_WEB_HOST=0.0.0.0
# torch.compile needs a C compiler at run time (Triton builds its launcher), which this runtime image
# does not carry: moshi's modules run uncompiled. CUDA graphs (fixed batch size B) are not affected.
ENV NO_TORCH_COMPILE=1
VOLUME ["/data/hf-cache", "/data/transcripts"]

# 9100: worker metrics/health; 8080: viewer.
EXPOSE 9100 8080
ENTRYPOINT ["captions"]
CMD ["worker", "start"]
