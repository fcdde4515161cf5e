# flamingo-bot for operators: compose.yaml runs it on a GPU. With podman, build with --format docker
# (its default OCI format drops the HEALTHCHECK):
#   podman build --format docker -t flamingo-bot .
# The Discord token comes only from the environment at run time (DISCORD_TOKEN, e.g. compose's .env).

# torch's wheels bring their own CUDA libraries; the CUDA image brings the NVIDIA runtime hookup. Any base
# with Python >= 3.11 and venv works (scripts/container-base.sh makes a Debian bookworm one), and one
# without Python (as Ubuntu 24.04's CUDA images) gets the distribution's from apt.
ARG BASE_IMAGE=nvidia/cuda:13.0.2-runtime-ubuntu24.04
FROM ${BASE_IMAGE}

# 1: also the Ray backend's packages (requirements-ray.txt), for service.backend = "ray".
ARG WITH_RAY=0

RUN if ! python3 -c 'import ensurepip, sys, venv; sys.exit(sys.version_info < (3, 11))' 2> /dev/null \
        || [ ! -f /etc/ssl/certs/ca-certificates.crt ]; then \
        apt-get update \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
            python3 python3-venv ca-certificates \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -c 'import sys; sys.exit(sys.version_info < (3, 11) and f"Python >= 3.11 is needed, not {sys.version}")' \
    && groupadd --system --gid 10001 flamingo \
    && useradd --system --uid 10001 --gid flamingo --create-home flamingo \
    && install -d -o flamingo -g flamingo /var/lib/flamingo-bot /var/cache/huggingface

ENV PATH=/opt/venv/bin:$PATH
WORKDIR /app
# The same pins as scripts/setup.sh, dependencies first so that a code change reuses this layer. The cache
# mount keeps downloaded wheels (several GB with torch and CUDA) for the next build that reinstalls.
COPY requirements.txt requirements-nodeps.txt requirements-ray.txt constraints.txt ./
RUN --mount=type=cache,target=/root/.cache/pip \
    python3 -m venv /opt/venv \
    && pip="pip install --disable-pip-version-check -c constraints.txt" \
    && $pip -r requirements.txt \
    && $pip --no-deps -r requirements-nodeps.txt \
    && if [ "$WITH_RAY" = 1 ]; then $pip -r requirements-ray.txt; fi
COPY . .

# The database and the downloaded models live on volumes; data/ stays the image's (the built-in tasks).
# Metrics are on so that the healthcheck can ask /health; publish 9464 only where a scraper needs it.
ENV HF_HOME=/var/cache/huggingface \
    FLAMINGO_STORAGE__DATABASE=/var/lib/flamingo-bot/flamingo.db \
    FLAMINGO_METRICS__ENABLED=true \
    FLAMINGO_METRICS__HOST=0.0.0.0 \
    FLAMINGO_METRICS__PORT=9464
VOLUME ["/var/lib/flamingo-bot", "/var/cache/huggingface"]
EXPOSE 9464
USER flamingo

# The first start downloads the model (about 20 GB) before /health answers; the image has no curl.
HEALTHCHECK --interval=30s --timeout=10s --start-period=15m --retries=3 \
    CMD python -c 'import os, urllib.request; urllib.request.urlopen("http://127.0.0.1:%s/health" % os.environ["FLAMINGO_METRICS__PORT"], timeout=8)'
ENTRYPOINT ["python", "main.py"]
