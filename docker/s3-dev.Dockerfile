# syntax=docker/dockerfile:1
#
# The development S3 server of compose.yaml: SeaweedFS (Apache-2.0), a production object
# store whose S3 gateway takes keys of any DICOM length, multipart uploads and signed
# requests. Its own image, with radflow's entrypoint (docker/s3-dev-entrypoint): one
# identity from S3_ACCESS_KEY/S3_SECRET_KEY (or their _FILE variants, for mounted
# Secrets) and the buckets of S3_BUCKETS created before the container reports healthy.
# Production uses the hospital's S3 through the same AWS_* settings.
#
#   docker build -f docker/s3-dev.Dockerfile -t radflow/s3-dev:4.48 .

ARG SEAWEEDFS_IMAGE=docker.io/chrislusf/seaweedfs:4.48

FROM ${SEAWEEDFS_IMAGE}
ARG SEAWEEDFS_VERSION=4.48
LABEL org.opencontainers.image.title="radflow-s3-dev" \
      org.opencontainers.image.description="SeaweedFS S3 server for the radflow compose stack" \
      org.opencontainers.image.version="${SEAWEEDFS_VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY docker/s3-dev-entrypoint /usr/local/bin/s3-dev-entrypoint
RUN addgroup -S -g 10001 s3 && adduser -S -D -H -u 10001 -G s3 s3 \
 && mkdir -p /data && chown 10001:10001 /data && chmod 0750 /data
USER 10001:10001
VOLUME ["/data"]
EXPOSE 9000
HEALTHCHECK --interval=5s --timeout=3s --start-period=10s --retries=10 \
  CMD ["/usr/local/bin/s3-dev-entrypoint", "health"]
ENTRYPOINT ["/usr/local/bin/s3-dev-entrypoint"]
