#!/usr/bin/env bash
# Brings a fresh machine (Debian bookworm, root) to the point where vmkeep's demo and test
# suite can run: apt packages, node modules, a build, and the tiny guest image.
# Idempotent: each step is skipped when its result is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '[setup] %s\n' "$*" >&2; }

# The packages among "$@" that dpkg does not list as installed, one per line.
missing_packages() {
  local p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || echo "$p"
  done
}

# Installing needs root: without it, stops with the command that installs "$@".
require_root_for() {
  if [ "$(id -u)" -ne 0 ]; then
    log "missing apt packages: $*; run as root or: sudo apt-get install --no-install-recommends $*"
    exit 1
  fi
}

# apt-get install of "$@" (plus pinned versions), without recommends or questions.
apt_install() {
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# mmdebstrap and systemd-container (systemd-nspawn): the .deb test's fresh Debian root;
# debian-archive-keyring: QEMU 10.0 from bookworm-backports for the upgrade tests;
# python3-prometheus-client: the Prometheus project's own parser, for the metrics test;
# ansible-core: the fleet example's test (examples/ansible/);
# syslinux and mtools: a disk the tiny guest boots from, for VMs without a kernel path (an operator's).
apt_packages=(qemu-system-x86 qemu-utils busybox-static dbus systemd util-linux iproute2 curl mmdebstrap systemd-container debian-archive-keyring python3-prometheus-client ansible-core syslinux mtools)
mapfile -t missing < <(missing_packages "${apt_packages[@]}")
if [ ${#missing[@]} -gt 0 ]; then
  require_root_for "${missing[@]}"
  log "installing apt packages: ${missing[*]}"
  apt_install "${missing[@]}"
fi

# The container tests: podman, and mmdebstrap (with uidmap) for the image's Debian root. apt
# would upgrade login and passwd with them: they are held at the installed versions.
oci_packages=(podman mmdebstrap uidmap)
mapfile -t oci_missing < <(missing_packages "${oci_packages[@]}")
if [ ${#oci_missing[@]} -gt 0 ]; then
  require_root_for "${oci_missing[@]}"
  log "installing apt packages: ${oci_missing[*]}"
  pins=()
  for p in login passwd; do
    v=$(dpkg-query -W -f='${Version}' "$p" 2>/dev/null) && pins+=("$p=$v")
  done
  apt_install "${oci_missing[@]}" "${pins[@]}"
fi

# A real snapd for the snap test (run only inside the test's private systemd). Its package
# scripts would start snapd and udev on the host: a policy-rc.d refusing every start is put in
# place for the install alone. squashfuse must stay absent (snapd would think it runs in a
# container and use fuse mounts).
snap_packages=(snapd squashfs-tools)
mapfile -t snap_missing < <(missing_packages "${snap_packages[@]}")
if [ ${#snap_missing[@]} -gt 0 ]; then
  require_root_for "${snap_missing[@]}"
  log "installing apt packages: ${snap_missing[*]} (no service started)"
  own_policy=no
  if [ -e /usr/sbin/policy-rc.d ]; then
    # One already there (container images ship one exiting 101) must refuse starts too.
    /usr/sbin/policy-rc.d snapd.service start >/dev/null 2>&1 && {
      log "/usr/sbin/policy-rc.d allows service starts; install by hand without starting snapd/udev: apt-get install --no-install-recommends ${snap_missing[*]}"
      exit 1
    }
  else
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod 0755 /usr/sbin/policy-rc.d
    own_policy=yes
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  apt_install "${snap_missing[@]}"
  if [ $own_policy = yes ]; then
    rm -f /usr/sbin/policy-rc.d
    trap - EXIT
  fi
fi

# The system user vmkeepd runs QEMU as (its default --qemu-user), as the .deb makes it; in the
# kvm group for /dev/kvm.
if ! getent passwd vmkeep-qemu >/dev/null; then
  log "creating the system user vmkeep-qemu"
  useradd --system --user-group --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin vmkeep-qemu
fi
if getent group kvm >/dev/null && ! id -nG vmkeep-qemu | grep -qw kvm; then
  usermod --append --groups kvm vmkeep-qemu
fi

# snapd's snap_daemon, which the snap's QEMU runs as (snap/snapcraft.yaml, system-usernames):
# the simulated snap (test/support/snap-sim.ts) has no snapd to create it, so it is made here as
# snapd makes it (uid and gid 584788); --no-log-init: no lastlog entry at that uid's offset.
if ! getent group snap_daemon >/dev/null; then
  groupadd --system --gid 584788 snap_daemon
fi
if ! getent passwd snap_daemon >/dev/null; then
  log "creating the system user snap_daemon"
  useradd --system --uid 584788 --gid 584788 --no-create-home --home-dir /nonexistent --shell /usr/bin/false --no-log-init snap_daemon
fi

# npm ci only when the lock file changed since the last install.
stamp=node_modules/.vmkeep-lock-stamp
if [ ! -f "$stamp" ] || ! cmp -s package-lock.json "$stamp"; then
  log "installing node modules (npm ci)"
  npm ci --no-audit --no-fund --loglevel=error
  cp package-lock.json "$stamp"
fi

log "building (tsc)"
npm run --silent build

log "tiny guest image"
bash test/guest/build-guest.sh >/dev/null

# A real second QEMU (10.0) beside the system's 7.2, for the upgrade tests, demo and bench.
log "QEMU from bookworm-backports (private apt state; the host's sources are not changed)"
bash test/support/fetch-qemu-backports.sh >/dev/null
