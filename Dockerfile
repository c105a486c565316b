# syntax=docker/dockerfile:1
# Granary container images, for users with a container engine (docker, podman, buildah):
#
#   docker build --target node     -t ghcr.io/granary-dev/granary-node:0.1.0 .
#   docker build --target operator -t ghcr.io/granary-dev/granary-operator:0.1.0 .
#
# scripts/images.sh builds the same images without an engine (mmdebstrap, umoci,
# skopeo): the same runtime root file system (this file's rootfs stage runs that
# script), user (65532, non-root), entrypoints, default commands, ports and labels. The release workflow
# (.github/workflows/release.yml) builds this file for linux/amd64 and linux/arm64.

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

# Built on the build machine's platform and cross-compiled for the target's (no emulation).
FROM --platform=$BUILDPLATFORM docker.io/library/rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS build
ARG TARGETARCH
WORKDIR /src
RUN set -eu; \
    case "$TARGETARCH" in \
      amd64) t=x86_64-unknown-linux-gnu; gnu=x86_64-linux-gnu; pkg=gcc-x86-64-linux-gnu ;; \
      arm64) t=aarch64-unknown-linux-gnu; gnu=aarch64-linux-gnu; pkg=gcc-aarch64-linux-gnu ;; \
      *) echo "unsupported TARGETARCH $TARGETARCH" >&2; exit 1 ;; \
    esac; \
    if [ "$(dpkg --print-architecture)" != "$TARGETARCH" ]; then \
      apt-get update && apt-get install -y --no-install-recommends "$pkg" libc6-dev-"$TARGETARCH"-cross \
      && rm -rf /var/lib/apt/lists/*; \
    fi; \
    rustup target add "$t"; \
    echo "$t" >/rust-target; echo "$gnu" >/gnu-triplet
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry,id=cargo-registry \
    --mount=type=cache,target=/src/target,id=cargo-target-${TARGETARCH},sharing=locked \
    set -eu; t=$(cat /rust-target); gnu=$(cat /gnu-triplet); \
    T=$(echo "$t" | tr 'a-z-' 'A-Z_'); \
    if command -v "$gnu-gcc" >/dev/null; then \
      export "CARGO_TARGET_${T}_LINKER=$gnu-gcc" "CC_$(echo "$t" | tr - _)=$gnu-gcc"; strip="$gnu-strip"; \
    else strip=strip; fi; \
    cargo build --release --locked --target "$t" \
        -p granary-storage-node --bin granary-node \
        -p granary-operator --bin granary-operator; \
    mkdir -p /out; \
    cp "target/$t/release/granary-node" "target/$t/release/granary-operator" /out/; \
    "$strip" --strip-debug /out/granary-node /out/granary-operator

# The runtime root file system: the same recipe as scripts/images.sh (Debian's C
# library, libgcc, CA certificates, time zones; no shell, no package manager), built by
# that script.
# mmdebstrap's extract variant runs nothing of the target's: it builds any architecture's
# root file system without emulation.
FROM --platform=$BUILDPLATFORM docker.io/library/debian:${DEBIAN_RELEASE} AS rootfs
ARG TARGETARCH
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends mmdebstrap ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY scripts/images.sh /usr/local/bin/granary-images.sh
RUN IMAGE_ARCH="$TARGETARCH" bash /usr/local/bin/granary-images.sh --rootfs /rootfs

FROM scratch AS runtime
COPY --from=rootfs /rootfs/ /
ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
WORKDIR /var/lib/granary
USER 65532:65532
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.version=${VERSION} \
      org.opencontainers.image.revision=${REVISION} \
      org.opencontainers.image.source=https://github.com/granary-dev/granary \
      org.opencontainers.image.licenses=Apache-2.0

FROM runtime AS operator
COPY --from=build /out/granary-operator /usr/local/bin/granary-operator
LABEL org.opencontainers.image.title=granary-operator \
      org.opencontainers.image.description="Granary Kubernetes operator"
ENTRYPOINT ["/usr/local/bin/granary-operator"]
CMD ["run"]

FROM runtime AS node
COPY --from=build /out/granary-node /usr/local/bin/granary-node
LABEL org.opencontainers.image.title=granary-node \
      org.opencontainers.image.description="Granary storage node: S3 and KV endpoints of a multi-tenant store"
EXPOSE 9000 9100 9200 9300
ENTRYPOINT ["/usr/local/bin/granary-node"]
CMD ["serve", "--config", "/etc/granary/node.toml"]
