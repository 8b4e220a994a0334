#!/usr/bin/env bash
# Builds the broker image (default tag backbone:dev) from any directory.
#
#   docker/build-image.sh
#
# 1. docker/build-base.sh makes the local debian:bookworm-slim base image if
#    it is missing (nothing is pulled; the first run takes a few minutes and
#    needs root for debootstrap).
# 2. The release binary is built on the host with cargo, unless
#    BACKBONE_BINARY names an already built one (a path relative to the
#    repository root, inside the build context: see .dockerignore).
# 3. docker build -f docker/Dockerfile from the repository root.
#
# Environment:
#   BACKBONE_IMAGE    image tag (default backbone:dev)
#   BACKBONE_BINARY   prebuilt binary to use instead of building one
#   DEBIAN_MIRROR     passed on to docker/build-base.sh
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
# A BACKBONE_BINARY relative to the caller's directory is resolved before
# moving to the repository root, then made relative to that root: docker
# build can only COPY from its context, and .dockerignore must let it in.
if [[ -n "${BACKBONE_BINARY:-}" ]]; then
    BACKBONE_BINARY="$(realpath -m "$BACKBONE_BINARY")"
    case "$BACKBONE_BINARY" in
        "$repo_root"/*) BACKBONE_BINARY="${BACKBONE_BINARY#"$repo_root"/}" ;;
        *)
            echo "build-image: BACKBONE_BINARY must be inside $repo_root (the build context)" >&2
            exit 1
            ;;
    esac
fi
cd "$repo_root"

image="${BACKBONE_IMAGE:-backbone:dev}"

log() { echo "build-image: $*"; }

docker/build-base.sh

if [[ -n "${BACKBONE_BINARY:-}" ]]; then
    binary="$BACKBONE_BINARY"
    log "using the prebuilt binary $binary"
else
    binary="target/release/backbone"
    log "cargo build --release -p backbone-broker --bin backbone"
    cargo build --release -p backbone-broker --bin backbone
    # With CARGO_TARGET_DIR set, cargo builds elsewhere; the build context
    # (see .dockerignore) only takes target/release/backbone, so put a copy there.
    built="${CARGO_TARGET_DIR:-target}/release/backbone"
    if [[ "$(realpath -m "$built")" != "$(realpath -m "$binary")" ]]; then
        log "copying $built to $binary (CARGO_TARGET_DIR is set)"
        mkdir -p target/release
        cp "$built" "$binary"
    fi
fi
if [[ ! -x "$binary" ]]; then
    echo "build-image: $binary is not an executable file" >&2
    exit 1
fi

log "docker build -f docker/Dockerfile -t $image ."
docker build -f docker/Dockerfile --build-arg "BACKBONE_BINARY=$binary" -t "$image" .
log "built $image, $(docker image inspect -f '{{.Size}}' "$image" | numfmt --to=si)B"
