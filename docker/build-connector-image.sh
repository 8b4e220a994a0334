#!/usr/bin/env bash
# Builds the Connector image (default tag backbone-connector:dev) from any
# directory, the way docker/build-image.sh builds the broker's.
#
#   docker/build-connector-image.sh
#
# 1. docker/build-base.sh makes the local debian:bookworm-slim base image if
#    it is missing (nothing is pulled; the first run takes a few minutes and
#    needs root for debootstrap).
# 2. The release binaries are built on the host with cargo: backbone-connector
#    and the example webhook receiver (connector/examples/webhook_receiver.rs).
# 3. docker build -f docker/connector.Dockerfile from the repository root.
#
# Environment:
#   BACKBONE_CONNECTOR_IMAGE   image tag (default backbone-connector:dev)
#   DEBIAN_MIRROR              passed on to docker/build-base.sh
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

image="${BACKBONE_CONNECTOR_IMAGE:-backbone-connector:dev}"
# Where the build context (see .dockerignore) takes the binaries from.
readonly connector="target/release/backbone-connector"
readonly receiver="target/release/examples/webhook_receiver"

log() { echo "build-connector-image: $*"; }

docker/build-base.sh

log "cargo build --release -p backbone-connector --bin backbone-connector --example webhook_receiver"
cargo build --release -p backbone-connector --bin backbone-connector --example webhook_receiver
# With CARGO_TARGET_DIR set, cargo builds elsewhere; the build context only
# takes the paths above, so put copies there.
target="${CARGO_TARGET_DIR:-target}"
for binary in "$connector" "$receiver"; do
    built="$target/${binary#target/}"
    if [[ "$(realpath -m "$built")" != "$(realpath -m "$binary")" ]]; then
        log "copying $built to $binary (CARGO_TARGET_DIR is set)"
        mkdir -p "$(dirname "$binary")"
        cp "$built" "$binary"
    fi
    if [[ ! -x "$binary" ]]; then
        echo "build-connector-image: $binary is not an executable file" >&2
        exit 1
    fi
done

log "docker build -f docker/connector.Dockerfile -t $image ."
docker build -f docker/connector.Dockerfile \
    --build-arg "CONNECTOR_BINARY=$connector" --build-arg "RECEIVER_BINARY=$receiver" \
    -t "$image" .
log "built $image, $(docker image inspect -f '{{.Size}}' "$image" | numfmt --to=si)B"
