#!/usr/bin/env bash
# Fetches a second, newer QEMU (Debian bookworm-backports, 10.0.x) into a git-ignored cache
# folder, for upgrade tests, the demo and the bench: a real version change beside the
# system's 7.2, with real machine-type compatibility.
#
#   bash test/support/fetch-qemu-backports.sh
#
# Output: test/.cache/qemu-backports/<version>/root (the packages unpacked with dpkg -x).
# The last line of stdout is the absolute path of that root; all other output goes to stderr.
#
# The host's apt sources and state are not touched: apt runs with a private sources folder,
# private lists and a private cache under test/.cache/qemu-backports/apt. Every library the
# binary needs is already on a bookworm host where qemu-system-x86 (7.2) is installed.
# Run it with QEMU_MODULE_DIR=ROOT/usr/lib/x86_64-linux-gnu/qemu and
# -L ROOT/usr/share/qemu -L /usr/share/seabios -L /usr/lib/ipxe/qemu.
# Idempotent: an unpacked root with a binary that runs is reused without asking apt.
set -euo pipefail

script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache=$(cd "$script_dir/.." && pwd)/.cache/qemu-backports
packages=(qemu-system-x86 qemu-system-common qemu-system-data)
suite=bookworm-backports
keyring=/usr/share/keyrings/debian-archive-keyring.gpg

log() { printf 'fetch-qemu-backports: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

runs() { QEMU_MODULE_DIR="$1/usr/lib/x86_64-linux-gnu/qemu" "$1/usr/bin/qemu-system-x86_64" -version >/dev/null 2>&1; }

# Reuse the newest root already unpacked (no network needed for a second run).
for root in $(ls -1d "$cache"/*/root 2>/dev/null | sort -rV); do
  if runs "$root"; then printf '%s\n' "$root"; exit 0; fi
done

[[ -r $keyring ]] || die "$keyring is missing; fix: apt-get install debian-archive-keyring"
apt_dir=$cache/apt
mkdir -p "$apt_dir/sources" "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial" "$apt_dir/download"
cat >"$apt_dir/sources/backports.sources" <<EOF
Types: deb
URIs: http://deb.debian.org/debian
Suites: $suite
Components: main
Signed-By: $keyring
EOF
apt_opts=(
  -o "Dir::Etc::sourcelist=/dev/null"
  -o "Dir::Etc::sourceparts=$apt_dir/sources"
  -o "Dir::State::lists=$apt_dir/lists"
  -o "Dir::Cache=$apt_dir/cache"
  -o "Debug::NoLocking=1"
  # The download folder is ours (root's), not apt's sandbox user's.
  -o "APT::Sandbox::User=root"
)
log "apt-get update ($suite, private state in $apt_dir)"
apt-get "${apt_opts[@]}" update -qq >&2
version=$(apt-cache "${apt_opts[@]}" show qemu-system-x86 2>/dev/null | sed -n 's/^Version: //p' | sort -rV | head -n1)
[[ -n $version ]] || die "apt found no qemu-system-x86 in $suite"
log "downloading ${packages[*]} $version"
rm -f "$apt_dir/download"/*.deb
(cd "$apt_dir/download" && apt-get "${apt_opts[@]}" download "${packages[@]/%/=$version}" >&2)
# A path without the epoch's ":" (which QEMU option strings and PATH-like lists dislike).
dest=$cache/${version#*:}
rm -rf "$dest.tmp"
mkdir -p "$dest.tmp/root"
for deb in "$apt_dir/download"/*.deb; do dpkg -x "$deb" "$dest.tmp/root"; done
runs "$dest.tmp/root" || die "the unpacked QEMU $version does not run: $(QEMU_MODULE_DIR="$dest.tmp/root/usr/lib/x86_64-linux-gnu/qemu" "$dest.tmp/root/usr/bin/qemu-system-x86_64" -version 2>&1 | tail -n3)"
rm -rf "$dest"
mv "$dest.tmp" "$dest"
rm -f "$apt_dir/download"/*.deb
log "QEMU $version unpacked in $dest/root"
printf '%s\n' "$dest/root"
