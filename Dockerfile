# syntax=docker/dockerfile:1
# Granary container images, for users with a container engine (docker, podman, buildah):
#
#   docker build --target node     -t ghcr.io/granary-dev/granary-node:0.1.0 .
#   docker build --target operator -t ghcr.io/granary-dev/granary-operator:0.1.0 .
#
# scripts/images.sh builds the same images without an engine (mmdebstrap, umoci,
# skopeo): same base (Debian bookworm with CA certificates), user (65532, non-root),
# entrypoints, default commands and labels. The release workflow
# (.github/workflows/release.yml) builds this file for linux/amd64 and linux/arm64.

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

FROM docker.io/library/rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked \
        -p granary-storage-node --bin granary-node \
        -p granary-operator --bin granary-operator \
 && mkdir -p /out \
 && cp target/release/granary-node target/release/granary-operator /out/ \
 && strip --strip-debug /out/granary-node /out/granary-operator

FROM docker.io/library/debian:${DEBIAN_RELEASE}-slim AS runtime
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates tzdata \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 65532 nonroot \
 && useradd --uid 65532 --gid 65532 --home-dir /home/nonroot --create-home \
        --shell /usr/sbin/nologin nonroot \
 && mkdir -p /var/lib/granary /etc/granary \
 && chown 65532:65532 /var/lib/granary
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
