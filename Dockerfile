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
RUN apt-get update \
 && apt-get install -y --no-install-recommends curl ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --create-home --home-dir /var/lib/convscope convscope
COPY --from=build /src/target/release/convscope /usr/local/bin/convscope
COPY --from=build --chown=convscope:convscope /src/models /var/lib/convscope/models
USER convscope
WORKDIR /var/lib/convscope
ENV CONVSCOPE_ADDR=0.0.0.0:8080 \
    CONVSCOPE_MODELS=/var/lib/convscope/models
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=3s --start-period=20s \
  CMD curl -fsS http://127.0.0.1:8080/healthz || exit 1
ENTRYPOINT ["convscope"]
CMD ["serve"]

# ---- build (CUDA): nvcc and the CUDA libraries are needed at build time ----
FROM nvidia/cuda:12.6.3-devel-ubuntu24.04 AS build-cuda
ARG RUST_VERSION
RUN apt-get update && apt-get install -y --no-install-recommends curl ca-certificates build-essential \
 && curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal --default-toolchain ${RUST_VERSION}
ENV PATH=/root/.cargo/bin:${PATH}
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p convscope --features cuda

# ---- runtime (CUDA): run with --gpus all, serve with --device cuda:0 ----
FROM nvidia/cuda:12.6.3-runtime-ubuntu24.04 AS cuda
RUN apt-get update \
 && apt-get install -y --no-install-recommends curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --create-home --home-dir /var/lib/convscope convscope
COPY --from=build-cuda /src/target/release/convscope /usr/local/bin/convscope
COPY --from=build-cuda --chown=convscope:convscope /src/models /var/lib/convscope/models
USER convscope
WORKDIR /var/lib/convscope
ENV CONVSCOPE_ADDR=0.0.0.0:8080 \
    CONVSCOPE_MODELS=/var/lib/convscope/models \
    CONVSCOPE_DEVICE=cuda:0
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=3s --start-period=20s \
  CMD curl -fsS http://127.0.0.1:8080/healthz || exit 1
ENTRYPOINT ["convscope"]
CMD ["serve"]

# The default target is the CPU image.
FROM cpu
