#!/usr/bin/env bash
# Builds the Dockerfile's build stage without a container engine: copies exactly the files its
# COPY lines name (nothing else of the checkout) into an empty folder and runs its RUN command
# there. A file the build needs but the Dockerfile does not copy fails here, as it would for a
# user running `docker build .`. The target folder is the checkout's (release profile), so the
# dependencies compile once for this check and `make image`.
#   hack/image/dockerfile-check.sh
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
context="$root/target/dockerfile-context"
rm -rf "$context"; mkdir -p "$context"

# The build stage: the lines up to the second FROM.
stage=$(awk '/^FROM /{n++} n==1' "$root/Dockerfile")
workdir=$(awk '$1=="WORKDIR"{print $2}' <<<"$stage" | tail -1)
[ "$workdir" = /src ] || { echo "dockerfile-check: expected WORKDIR /src, got '$workdir'" >&2; exit 1; }
while read -r _ args; do
  # shellcheck disable=SC2206
  parts=($args)
  dest=${parts[-1]}
  for src in "${parts[@]:0:${#parts[@]}-1}"; do
    case $dest in
      ./) cp -a "$root/$src" "$context/" ;;
      ./*) mkdir -p "$context/$(dirname "${dest#./}")"; cp -a "$root/$src" "$context/${dest#./}" ;;
      *) echo "dockerfile-check: unsupported COPY destination $dest" >&2; exit 1 ;;
    esac
  done
done < <(grep '^COPY ' <<<"$stage" | grep -v -- '--from')
command=$(grep '^RUN ' <<<"$stage" | sed 's/^RUN //')
[ -n "$command" ] || { echo "dockerfile-check: no RUN in the build stage" >&2; exit 1; }
echo "dockerfile-check: $(cd "$context" && find . -maxdepth 1 | sort | tr '\n' ' ')" >&2
echo "dockerfile-check: $command" >&2
cd "$context"
CARGO_TARGET_DIR="$root/target" bash -c "$command"
# Cargo records the sources of this build by their path under the target folder, and the
# checkout's crates share their fingerprints: while the copy is there, a later
# `cargo build --release` in the checkout checks the copy's files, finds them unchanged and keeps
# this binary, however the checkout was edited since. Without the copy it rebuilds.
rm -rf "$context"
echo "dockerfile-check: built $root/target/release/templatecache from the Dockerfile's files only" >&2
