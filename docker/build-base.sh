#!/usr/bin/env bash
# Builds the local base image `debian:bookworm-slim` without pulling anything.
#
# Our Docker engines may have no registry to pull from, so the image that
# docker/Dockerfile starts FROM is made here: debootstrap fetches Debian
# packages (plain HTTP from a Debian mirror, which is reachable), and the root
# file system is slimmed the way the official slim images are (see
# debuerreotype's `debuerreotype-slimify`) and imported with `docker import`.
#
# It needs root: debootstrap creates device nodes, chroots into the new
# system and sets file ownership. If debootstrap is missing, it is installed
# with apt-get from Debian's packages.
#
# Usage: docker/build-base.sh [--force]
#   --force          rebuild even if debian:bookworm-slim already exists
#   DEBIAN_MIRROR    the Debian mirror (default http://deb.debian.org/debian)
set -euo pipefail

readonly image="debian:bookworm-slim"
readonly suite="bookworm"
readonly mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"

log() { echo "build-base: $*"; }

force=false
case "${1:-}" in
    --force) force=true ;;
    "") ;;
    *)
        echo "usage: $0 [--force]" >&2
        exit 2
        ;;
esac

if ! $force && docker image inspect "$image" >/dev/null 2>&1; then
    log "$image is present; nothing to do (--force rebuilds it)"
    exit 0
fi
if [[ $EUID -ne 0 ]]; then
    echo "build-base: debootstrap needs root; rerun as root (or with sudo)" >&2
    exit 1
fi
command -v debootstrap >/dev/null || PATH="$PATH:/usr/sbin:/sbin"
if ! command -v debootstrap >/dev/null; then
    # A fresh machine of this project's kind has Debian's package archive but
    # not debootstrap: install it from there, as the tests need it.
    command -v apt-get >/dev/null || {
        echo "build-base: debootstrap is not installed and there is no apt-get to install it" >&2
        exit 1
    }
    log "installing debootstrap from Debian's packages"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap >/dev/null
fi

rootfs="$(mktemp -d /tmp/backbone-rootfs.XXXXXX)"
cleanup() {
    # debootstrap mounts /proc and /sys inside the target while it runs; if it
    # was interrupted they may still be mounted, and removing the directory
    # must never reach into them.
    local mount
    for mount in $(findmnt -rn -o TARGET | grep -F "$rootfs" | sort -r); do
        umount -l "$mount" || true
    done
    rm -rf --one-file-system "$rootfs"
}
trap cleanup EXIT

log "debootstrap --variant=minbase $suite from $mirror into $rootfs (a few minutes)"
debootstrap --variant=minbase "$suite" "$rootfs" "$mirror"

log "slimming the root file system"
# Keep later `apt-get install`s in derived images slim too, as the official
# images do: dpkg skips docs, man pages and translations from now on.
cat >"$rootfs/etc/dpkg/dpkg.cfg.d/docker" <<'CFG'
# Slim image: no documentation or translations (copyright files are kept).
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
CFG
cat >"$rootfs/etc/apt/apt.conf.d/docker-clean" <<'CFG'
# Containers are rebuilt, not upgraded in place: drop downloaded packages.
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
CFG
cat >"$rootfs/etc/apt/apt.conf.d/docker-no-languages" <<'CFG'
Acquire::Languages "none";
CFG
cat >"$rootfs/etc/apt/apt.conf.d/docker-autoremove-suggests" <<'CFG'
Apt::AutoRemove::SuggestsImportant "false";
CFG
# Package scripts must not start daemons during image builds.
printf '#!/bin/sh\nexit 101\n' >"$rootfs/usr/sbin/policy-rc.d"
chmod 755 "$rootfs/usr/sbin/policy-rc.d"

find "$rootfs/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
find "$rootfs/usr/share/doc" -mindepth 1 -type d -empty -delete
rm -rf "$rootfs"/usr/share/{man,groff,info,lintian,linda}/*
find "$rootfs/usr/share/locale" -mindepth 1 -maxdepth 1 -not -name locale.alias -exec rm -rf {} +
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin \
    "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/cache/apt/archives/partial/*.deb \
    "$rootfs"/var/cache/debconf/*-old "$rootfs"/var/lib/dpkg/*-old \
    "$rootfs"/var/log/apt/* "$rootfs"/tmp/* "$rootfs"/var/tmp/*
find "$rootfs/var/log" -type f -exec truncate -s 0 {} +
# The engine provides these per container; an image must not carry the
# build host's values.
: >"$rootfs/etc/hostname"
: >"$rootfs/etc/resolv.conf"
: >"$rootfs/etc/machine-id"
printf 'deb %s %s main\ndeb %s %s-updates main\ndeb http://deb.debian.org/debian-security %s-security main\n' \
    "$mirror" "$suite" "$mirror" "$suite" "$suite" >"$rootfs/etc/apt/sources.list"

log "importing $(du -sh --one-file-system "$rootfs" | cut -f1) as $image"
tar --numeric-owner --xattrs -C "$rootfs" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["bash"]' \
    --message "debootstrap --variant=minbase $suite $mirror, slimmed" \
    - "$image" >/dev/null
log "done: $(docker image inspect -f '{{.Id}} {{.Size}} bytes' "$image")"
