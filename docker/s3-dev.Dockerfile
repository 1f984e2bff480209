# syntax=docker/dockerfile:1
#
# The development S3 server of compose.yaml: s3s-fs (crates.io, Apache-2.0), a small
# S3-compatible server that keeps objects as files in a folder and checks request
# signatures. Buckets named in S3_BUCKETS are created at start (docker/s3-dev-entrypoint),
# so `docker compose up` needs no separate bucket step. For development and tests only:
# production uses the hospital's S3 (or any S3-compatible store) through the same
# AWS_* settings.
#
#   docker build -f docker/s3-dev.Dockerfile -t radflow/s3-dev:0.14.1 .

ARG RUST_IMAGE=docker.io/library/rust:1.95-slim-bookworm
ARG RUNTIME_IMAGE=docker.io/library/debian:bookworm-slim

FROM ${RUST_IMAGE} AS build
ARG S3S_FS_VERSION=0.14.1
RUN cargo install s3s-fs --locked --version "${S3S_FS_VERSION}" --features binary --root /out

FROM ${RUNTIME_IMAGE}
ARG S3S_FS_VERSION=0.14.1
LABEL org.opencontainers.image.title="radflow-s3-dev" \
      org.opencontainers.image.description="s3s-fs development S3 server for the radflow compose stack" \
      org.opencontainers.image.version="${S3S_FS_VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 s3 \
 && useradd --system --uid 10001 --gid s3 --no-create-home --shell /usr/sbin/nologin s3 \
 && install -d -o s3 -g s3 -m 0750 /data
COPY --from=build /out/bin/s3s-fs /usr/local/bin/s3s-fs
COPY docker/s3-dev-entrypoint docker/radflow-probe /usr/local/bin/
USER 10001:10001
VOLUME ["/data"]
EXPOSE 9000
HEALTHCHECK --interval=5s --timeout=3s --start-period=5s --retries=5 \
  CMD ["/usr/local/bin/radflow-probe", "--tcp", "9000"]
ENTRYPOINT ["/usr/local/bin/s3-dev-entrypoint"]
