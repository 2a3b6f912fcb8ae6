# lit-deepseek on a CUDA PyTorch image. FlashMLA and DeepEP are optional Hopper accelerators built
# from their public sources: docker build --build-arg WITH_FLASH_MLA=1 --build-arg WITH_DEEP_EP=1 .
# WITH_DEEP_EP=1 also installs NVSHMEM (the nvidia-nvshmem-cu12 wheel) that DeepEP builds against;
# at run time DeepEP needs NVLink between the GPUs of a node (and RDMA with IBGDA across nodes).
# Run with what NCCL needs: docker run --gpus all --ipc=host --shm-size=16g ...
ARG BASE_IMAGE=pytorch/pytorch:2.11.0-cuda12.8-cudnn9-devel
FROM ${BASE_IMAGE}

ARG WITH_FLASH_MLA=0
ARG WITH_DEEP_EP=0
ARG FLASH_MLA_REF=main
ARG DEEP_EP_REF=main
ARG TORCH_CUDA_ARCH_LIST=9.0

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST}

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends git \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/lit-deepseek
COPY pyproject.toml README.md ./
COPY lit_deepseek ./lit_deepseek
COPY configs ./configs
COPY examples ./examples
# the project itself, from this checkout, installed in place: the shipped configs/ and examples/ stay
# in /opt/lit-deepseek next to the package
# hadolint ignore=DL3013
RUN pip install -e ".[gpu]"

RUN if [ "${WITH_FLASH_MLA}" = "1" ]; then \
        git clone https://github.com/deepseek-ai/FlashMLA.git /tmp/flash-mla \
        && git -C /tmp/flash-mla checkout "${FLASH_MLA_REF}" \
        && git -C /tmp/flash-mla submodule update --init --recursive \
        && pip install --no-build-isolation /tmp/flash-mla \
        && rm -rf /tmp/flash-mla; \
    fi
# hadolint ignore=DL3013
RUN if [ "${WITH_DEEP_EP}" = "1" ]; then \
        pip install nvidia-nvshmem-cu12 \
        && NVSHMEM_DIR="$(python -c 'import importlib.util as u; print(u.find_spec("nvidia.nvshmem").submodule_search_locations[0])')" \
        && git clone https://github.com/deepseek-ai/DeepEP.git /tmp/deep-ep \
        && git -C /tmp/deep-ep checkout "${DEEP_EP_REF}" \
        && git -C /tmp/deep-ep submodule update --init --recursive \
        && NVSHMEM_DIR="${NVSHMEM_DIR}" pip install --no-build-isolation /tmp/deep-ep \
        && echo "${NVSHMEM_DIR}/lib" > /etc/ld.so.conf.d/nvshmem.conf && ldconfig \
        && rm -rf /tmp/deep-ep; \
    fi

RUN useradd --create-home --uid 1000 trainer \
    && mkdir -p /workspace \
    && chown trainer:trainer /workspace
USER 1000:1000
WORKDIR /workspace

ENTRYPOINT ["lit-deepseek"]
CMD ["--help"]
