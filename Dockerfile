# otvllm container image.
#
# CPU (default; what `docker compose up` runs):
#   docker build -t otvllm:cpu .
# NVIDIA GPU (what the compose `gpu` profile builds): a CUDA torch build, Triton and the
# C compiler Triton needs at run time to build its small launcher module:
#   docker build -t otvllm:gpu \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130 \
#     --build-arg OTVLLM_EXTRAS=triton \
#     --build-arg EXTRA_APT_PACKAGES="gcc libc6-dev" .
#
# Layers go from least to most often changed: system packages, torch, the dependencies
# listed in pyproject.toml, then the otvllm sources. Editing otvllm/ rebuilds only the
# last two small layers.

# Python 3.11 or newer (the dependency step reads pyproject.toml with tomllib), pinned to a
# patch release and a Debian release so that a rebuild gets the same base.
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm
FROM ${PYTHON_IMAGE}

# Where torch comes from: the CPU-only wheels by default (about 5x smaller than the CUDA
# ones); https://download.pytorch.org/whl/cu130 (or cu126 for older drivers) for GPUs.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# A pip requirement for torch itself: the version the tests run with (pass another to change it).
ARG TORCH_SPEC=torch==2.13.0
# Comma-separated extras of the otvllm package to install as well (e.g. "triton").
ARG OTVLLM_EXTRAS=""
# Debian packages to add (the GPU build adds a C compiler for Triton).
ARG EXTRA_APT_PACKAGES=""
# Further pip requirements, space-separated, installed with the dependencies. The compose
# CPU image adds "openai>=1.40" (the spec of otvllm's `test` extra) for scripts/loadgen.py,
# without the rest of that extra (pytest, triton, ...).
ARG EXTRA_PIP_PACKAGES=""

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

RUN if [ -n "${EXTRA_APT_PACKAGES}" ]; then \
        apt-get update \
        && apt-get install -y --no-install-recommends ${EXTRA_APT_PACKAGES} \
        && rm -rf /var/lib/apt/lists/*; \
    fi

# 1. torch, from the index chosen above. Installed first and on its own so that the
#    dependency step below finds `torch>=...` already satisfied and does not pull the
#    (CUDA) torch from PyPI instead.
RUN pip install --index-url "${TORCH_INDEX_URL}" "${TORCH_SPEC}"

WORKDIR /opt/otvllm

# 2. The other dependencies, read from the project metadata alone (no sources yet), so
#    this layer is reused until pyproject.toml (or a build argument) changes.
COPY pyproject.toml ./
RUN python -c "import tomllib; \
p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
extras = [e.strip() for e in '${OTVLLM_EXTRAS}'.split(',') if e.strip()]; \
deps = list(p['dependencies']) + [d for e in extras for d in p['optional-dependencies'][e]]; \
deps += '${EXTRA_PIP_PACKAGES}'.split(); \
open('/tmp/requirements.txt', 'w').write('\n'.join(deps) + '\n')" \
    && cat /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# 3. The package itself (dependencies are all in place: --no-deps).
COPY otvllm/ ./otvllm/
RUN touch README.md \
    && pip install --no-deps . \
    && rm -rf build ./*.egg-info \
    && python -c "import otvllm"

# 4. An unprivileged user whose cache (the synthetic demo model, Hugging Face files,
#    Triton's compiled kernels) lives in its home directory.
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin otvllm \
    && mkdir -p /home/otvllm/.cache/otvllm /home/otvllm/.cache/huggingface /home/otvllm/.cache/triton \
    && chown -R otvllm:otvllm /home/otvllm/.cache
ENV OTVLLM_CACHE_DIR=/home/otvllm/.cache/otvllm \
    HF_HOME=/home/otvllm/.cache/huggingface \
    TRITON_CACHE_DIR=/home/otvllm/.cache/triton \
    OTEL_SERVICE_NAME=otvllm
USER otvllm
WORKDIR /home/otvllm

ENTRYPOINT ["otvllm"]
CMD ["--help"]
