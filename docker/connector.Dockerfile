# The Backbone Connector image: `backbone-connector`, and the example webhook
# receiver (connector/examples/webhook_receiver.rs) as
# `backbone-webhook-receiver`, for trying webhooks out.
#
# Build it with docker/build-connector-image.sh, which makes the local base
# image if it is missing (docker/build-base.sh: nothing is pulled) and the
# release binaries, then runs
#   docker build -f docker/connector.Dockerfile -t backbone-connector:dev .
# from the repository root. As with the broker's image (docker/Dockerfile),
# nothing is compiled here: the binaries built on the host (Debian bookworm
# too) are copied in, and only they and docker/ are used from the build
# context (see .dockerignore).
#
# The data volume holds the Connector's config, identity key and database.
# Make them once with `init`, which prints the API key (only its hash is
# kept), then serve:
#   docker run --rm -v connector-data:/var/lib/backbone-connector \
#       -v "$PWD/broker-ca.pem:/etc/backbone/ca.pem:ro" backbone-connector:dev \
#       init --data-dir /var/lib/backbone-connector --server backbone.example.org:7700 --ca /etc/backbone/ca.pem
#   docker run -d -p 127.0.0.1:8080:8080 -v connector-data:/var/lib/backbone-connector \
#       -v "$PWD/broker-ca.pem:/etc/backbone/ca.pem:ro" backbone-connector:dev
# A broker, two Connectors and a webhook receiver: docker/compose.connector.yaml.
FROM debian:bookworm-slim

# A system user without a login shell that owns the data directory and
# nothing else, as in the broker's image; its uid and gid are fixed for
# runAsNonRoot and for volumes prepared outside Docker.
RUN groupadd --system --gid 999 connector \
    && useradd --system --uid 999 --gid 999 --no-create-home --home-dir /var/lib/backbone-connector \
        --shell /usr/sbin/nologin connector \
    && install -d -o connector -g connector -m 0750 /var/lib/backbone-connector

COPY docker/http-health /usr/local/bin/http-health

# Copied last: the binaries change on every build, the layers above do not.
ARG RECEIVER_BINARY=target/release/examples/webhook_receiver
COPY ${RECEIVER_BINARY} /usr/local/bin/backbone-webhook-receiver
ARG CONNECTOR_BINARY=target/release/backbone-connector
COPY ${CONNECTOR_BINARY} /usr/local/bin/backbone-connector

# `serve` reads the config `init` wrote into the volume (the working
# directory, where `init` writes connector.toml by default). The shipped
# config listens on loopback; in a container the API must listen on every
# interface to be published at all. Publish it on loopback or behind a
# TLS-terminating proxy: the API is plain HTTP.
ENV BACKBONE_CONNECTOR_CONFIG=/var/lib/backbone-connector/connector.toml \
    BACKBONE_CONNECTOR__API__LISTEN=0.0.0.0:8080

# A named volume mounted here starts as a copy of this directory, so it is
# owned by the connector user too.
VOLUME ["/var/lib/backbone-connector"]
WORKDIR /var/lib/backbone-connector
USER connector

# 8080/tcp: the REST API and /health.
EXPOSE 8080/tcp

# http-health GETs /health on the port of BACKBONE_CONNECTOR__API__LISTEN
# with bash's /dev/tcp (the image has no curl). /health answers 200 only
# while the Connector is connected to the Backbone.
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 \
    CMD ["http-health"]

# The Connector stops on SIGTERM: the API finishes the requests in flight,
# then the Backbone connection is closed.
STOPSIGNAL SIGTERM
ENTRYPOINT ["backbone-connector"]
CMD ["serve"]
