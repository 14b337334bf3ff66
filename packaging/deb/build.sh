#!/usr/bin/env bash
# Builds vmkeep's Debian package from this tree:
#
#   npm run package:deb [-- --version V] [--out DIR] [--compress xz|gzip|zstd|none]
#
# Output: DIR/vmkeep_V_amd64.deb (default DIR: packaging/deb/out, git-ignored); the path of the
# .deb is the last line of stdout, everything else goes to stderr.
#
# Layout: /usr/lib/vmkeep/{dist,node_modules,package.json} (the compiled JavaScript and its
# production dependencies), /usr/lib/vmkeep/node (the official Node.js build, pinned below),
# /usr/bin/vmkeep and /usr/bin/vmkeepd (wrappers running them on that Node), the units from
# snap/ in /lib/systemd/system, maintainer scripts in the shape dh_installsystemd writes.
# Needs: node + npm (to build), dpkg-deb. No debhelper: the scripts are in this folder.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)

# shellcheck source=../common/app.sh
source "$here/../common/app.sh"

log() { printf 'package:deb: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

version=$(node -p 'require(process.argv[1]).version' "$root/package.json")
out="$here/out"
compress=xz
while [[ $# -gt 0 ]]; do
  case $1 in
    --version) version=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --compress) compress=$2; shift 2 ;;
    *) die "unknown argument $1 (use --version V, --out DIR, --compress xz|gzip|zstd|none)" ;;
  esac
done
[[ $version =~ ^[0-9][A-Za-z0-9.+~-]*$ ]] || die "--version $version is not a Debian version (it must start with a digit)"
command -v dpkg-deb >/dev/null || die "dpkg-deb not found: apt-get install dpkg"

mkdir -p "$out"
out=$(cd "$out" && pwd)
# Downloads are kept here whatever --out says (git-ignored).
cache="$here/out/cache"
mkdir -p "$cache"

node_tgz=$(fetch_node "$cache")
build_app

stage=$(mktemp -d "$out/stage.XXXXXX")
trap 'rm -rf "$stage"' EXIT
lib="$stage/usr/lib/vmkeep"
mkdir -p "$lib" "$stage/usr/bin" "$stage/lib/systemd/system" "$stage/DEBIAN" "$stage/usr/share/doc/vmkeep"
# The VMs' console and QEMU logs (vmkeepd's default --log-dir); guest output is root's only.
install -d -m 0700 "$stage/var/log/vmkeep"

stage_app "$lib" "$version"
install_node "$node_tgz" "$lib/node/bin" "$stage/usr/share/doc/vmkeep/node-LICENSE"

for pair in vmkeep:main.js vmkeepd:vmkeepd.js; do
  name=${pair%%:*}
  sed -e "s/@NAME@/$name/g" -e "s/@SCRIPT@/${pair#*:}/g" "$here/wrapper.in" > "$stage/usr/bin/$name"
  chmod 0755 "$stage/usr/bin/$name"
done

cp "$root/snap/vmkeepd.service" "$root/snap/vmkeepd.socket" "$root/snap/vmkeep-guests.service" "$stage/lib/systemd/system/"
chmod 0644 "$stage/lib/systemd/system/"*.service "$stage/lib/systemd/system/"*.socket
cat > "$stage/usr/share/doc/vmkeep/copyright" <<COPYRIGHT
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: vmkeep

Files: *
License: Apache-2.0
 On Debian systems the full text is in /usr/share/common-licenses/Apache-2.0.

Files: usr/lib/vmkeep/node/*
License: MIT and others
 Node.js $NODE_VERSION, the official build; its licenses are in node-LICENSE here.

Files: usr/lib/vmkeep/node_modules/*
License: various (MIT, ISC, Apache-2.0)
 Each module's license file is in its folder.
COPYRIGHT

size=$(du -sk --exclude=DEBIAN "$stage" | cut -f1)
sed -e "s/@VERSION@/$version/" -e "s/@SIZE@/$size/" -e "s/@NODE_VERSION@/$NODE_VERSION/" "$here/control.in" > "$stage/DEBIAN/control"
for script in postinst prerm postrm; do
  install -m 0755 "$here/$script" "$stage/DEBIAN/$script"
done

deb="$out/vmkeep_${version}_amd64.deb"
log "packing $deb ($compress)"
dpkg-deb --root-owner-group -Z"$compress" --build "$stage" "$deb" >&2
echo "$deb"
