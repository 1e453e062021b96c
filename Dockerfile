# convscope images. CPU (default):   docker build -t convscope .
#                   CUDA:            docker build --target cuda -t convscope:cuda .
# Not built in this project's CI (no Docker engine on its machines); the
# build steps are the README's, so they are exercised there.

ARG RUST_VERSION=1.95

# ---- build (CPU) ----
FROM rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p convscope

# ---- runtime (CPU) ----
FROM debian:bookworm-slim AS cpu
# Unpinned on purpose: bookworm's security updates for curl and CA
# certificates should reach every rebuild.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends curl ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --create-home --home-dir /var/lib/convscope convscope
COPY --from=build /src/target/release/convscope /usr/local/bin/convscope
COPY --from=build --chown=convscope:convscope /src/models /var/lib/convscope/models
# Datasets for training and evaluation jobs (MNIST, the CIFAR-10 sample), and
# the job queue's directory, owned by the service so a volume mounted there is too.
COPY --from=build --chown=convscope:convscope /src/data/mnist /var/lib/convscope/data/mnist
COPY --from=build --chown=convscope:convscope /src/data/cifar10 /var/lib/convscope/data/cifar10
RUN install -d -o convscope -g convscope /var/lib/convscope/jobs
USER 10001
WORKDIR /var/lib/convscope
ENV CONVSCOPE_ADDR=0.0.0.0:8080 \
    CONVSCOPE_MODELS=/var/lib/convscope/models \
    CONVSCOPE_DATASETS=/var/lib/convscope/data \
    CONVSCOPE_JOBS_DB=/var/lib/convscope/jobs/jobs.sqlite3
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=3s --start-period=20s \
  CMD ["curl", "-fsS", "http://127.0.0.1:8080/healthz"]
ENTRYPOINT ["convscope"]
CMD ["serve"]

# ---- build (CUDA): nvcc and the CUDA libraries are needed at build time ----
FROM nvidia/cuda:12.6.3-devel-ubuntu24.04 AS build-cuda
ARG RUST_VERSION
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends curl ca-certificates build-essential \
 && curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal --default-toolchain ${RUST_VERSION}
ENV PATH=/root/.cargo/bin:${PATH}
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p convscope --features cuda

# ---- runtime (CUDA): run with --gpus all, serve with --device cuda:0 ----
FROM nvidia/cuda:12.6.3-runtime-ubuntu24.04 AS cuda
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --create-home --home-dir /var/lib/convscope convscope
COPY --from=build-cuda /src/target/release/convscope /usr/local/bin/convscope
COPY --from=build-cuda --chown=convscope:convscope /src/models /var/lib/convscope/models
# Datasets for training and evaluation jobs (MNIST, the CIFAR-10 sample), and
# the job queue's directory, owned by the service so a volume mounted there is too.
COPY --from=build-cuda --chown=convscope:convscope /src/data/mnist /var/lib/convscope/data/mnist
COPY --from=build-cuda --chown=convscope:convscope /src/data/cifar10 /var/lib/convscope/data/cifar10
RUN install -d -o convscope -g convscope /var/lib/convscope/jobs
USER 10001
WORKDIR /var/lib/convscope
ENV CONVSCOPE_ADDR=0.0.0.0:8080 \
    CONVSCOPE_MODELS=/var/lib/convscope/models \
    CONVSCOPE_DATASETS=/var/lib/convscope/data \
    CONVSCOPE_JOBS_DB=/var/lib/convscope/jobs/jobs.sqlite3 \
    CONVSCOPE_DEVICE=cuda:0
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=3s --start-period=20s \
  CMD ["curl", "-fsS", "http://127.0.0.1:8080/healthz"]
ENTRYPOINT ["convscope"]
CMD ["serve"]

# The default target is the CPU image.
FROM cpu
