#!/usr/bin/env bash
# OCI images without a container daemon, pushed to the node's registry (hack/node.sh registry):
#
#   hack/image.sh operator   target/release/templatecache with the shared libraries ldd lists,
#                            CA certificates and user 65532, as <registry>/templatecache:$TAG
#   hack/image.sh consumer   Debian's busybox-static (sh, sha256sum, wget, ...), for Pods that
#                            read a staged file, and kube-whoami (hack/node/whoami), as
#                            <registry>/templatecache-consumer:$TAG
#   hack/image.sh all        both (make image)
#
# TAG defaults to dev; BINARY=path skips the cargo build and packages that binary. The layer is
# written by Python's tarfile with fixed owners and times, so the same binary gives the same
# digest; crane (hack/crane) appends it to an empty OCI base and
# sets the config (the Dockerfile's Entrypoint, Cmd and USER). Prints one reference a line,
# with its digest.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
tag=${TAG:-dev}
eval "$("$root/hack/node/build.sh" crane whoami)"
"$root/hack/node.sh" registry
# shellcheck disable=SC1091
. "$root/.cluster/node-ports"
# shellcheck source=hack/node/env.sh
source "$root/hack/node/env.sh"
registry="$NODE_IP:$REGISTRY_PORT"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# layer OUT SRC=DEST...: a tar of host files at image paths (symlinks followed), plus /etc/passwd,
# /etc/group, /tmp and the non-root user's home. Owners are root, except that home.
layer() {
  local out=$1; shift
  python3 - "$out" "$@" <<'PY'
import io, sys, tarfile
out, pairs = sys.argv[1], sys.argv[2:]
def info(name, kind, mode, uid=0, size=0):
    t = tarfile.TarInfo(name); t.type = kind; t.mode = mode; t.uid = t.gid = uid; t.size = size; t.mtime = 0
    return t
with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
    dirs = set()
    def parents(path):
        parts = path.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d and d not in dirs:
                dirs.add(d); tar.addfile(info(d, tarfile.DIRTYPE, 0o755))
    def add_bytes(path, data, mode):
        parents(path); tar.addfile(info(path, tarfile.REGTYPE, mode, size=len(data)), io.BytesIO(data))
    for pair in pairs:
        src, dest = pair.split("=", 1)
        dest = dest.lstrip("/")
        if src.startswith("@"):  # a symlink: @TARGET=DEST
            parents(dest); t = info(dest, tarfile.SYMTYPE, 0o777); t.linkname = src[1:]; tar.addfile(t); continue
        data = open(src, "rb").read()
        add_bytes(dest, data, 0o755 if dest.startswith(("usr/local/bin/", "bin/")) or ".so" in dest else 0o644)
    add_bytes("etc/passwd", b"root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n", 0o644)
    add_bytes("etc/group", b"root:x:0:\nnonroot:x:65532:\n", 0o644)
    tar.addfile(info("tmp", tarfile.DIRTYPE, 0o1777))
    parents("home/x")
    tar.addfile(info("home/nonroot", tarfile.DIRTYPE, 0o755, uid=65532))
PY
}

# push NAME LAYER CONFIG-FLAG...: the image with that config (an empty OCI base has none: no
# platform, no Entrypoint), printed as name@digest and kept in .cluster/images.env as
# <NAME>_IMAGE=name@digest (TEMPLATECACHE_IMAGE, TEMPLATECACHE_CONSUMER_IMAGE) for tests.
push() {
  local name=$1 ref="$registry/$1:$tag" layer=$2; shift 2
  {
    "$CRANE" append --insecure --oci-empty-base -f "$layer" -t "$ref"
    "$CRANE" mutate --insecure "$ref" --set-platform linux/amd64 --user 65532:65532 "$@" -t "$ref"
  } >"$work/crane.log" 2>&1 || { cat "$work/crane.log" >&2; exit 1; }
  local pinned key env="$root/.cluster/images.env"
  pinned="$ref@$("$CRANE" digest --insecure "$ref")"
  key=$(echo "$name" | tr a-z- A-Z_)_IMAGE
  { grep -v "^$key=" "$env" 2>/dev/null || true; echo "$key=$pinned"; } > "$env.tmp"
  mv "$env.tmp" "$env"
  echo "$pinned"
}

# BINARY=path packages that binary instead of building target/release/templatecache.
operator() {
  local bin=${BINARY:-$root/target/release/templatecache} pairs lib
  [ -n "${BINARY:-}" ] || (cd "$root" && cargo build --release --bin templatecache >&2)
  pairs=("$bin=/usr/local/bin/templatecache" "/etc/ssl/certs/ca-certificates.crt=/etc/ssl/certs/ca-certificates.crt")
  # Every shared library the binary loads (and the loader itself), at the path it is loaded from.
  for lib in $(ldd "$bin" | awk '$2=="=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}' | sort -u); do
    pairs+=("$lib=$lib")
  done
  layer "$work/operator.tar" "${pairs[@]}"
  push templatecache "$work/operator.tar" --entrypoint /usr/local/bin/templatecache --cmd run
}

consumer() {
  local busybox=/bin/busybox pairs a
  if [ ! -x "$busybox" ] || ldd "$busybox" >/dev/null 2>&1; then
    echo "image: needs Debian's busybox-static (a static /bin/busybox)" >&2; exit 1
  fi
  pairs=("$busybox=/bin/busybox" "$WHOAMI=/bin/kube-whoami")
  for a in sh sha256sum wget cat ls sleep test id env grep head; do pairs+=("@busybox=/bin/$a"); done
  layer "$work/consumer.tar" "${pairs[@]}"
  push templatecache-consumer "$work/consumer.tar" --cmd /bin/sh
}

case "${1:-all}" in
  operator) operator ;;
  consumer) consumer ;;
  all) consumer; operator ;;
  *) echo "usage: $0 operator|consumer|all" >&2; exit 2 ;;
esac
