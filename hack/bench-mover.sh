#!/usr/bin/env bash
# The data mover against curl on the same 1 GiB file on loopback: over HTTP (python's
# http.server) against `curl -o`, from S3 (versitygw) against a plain SigV4 read by curl, and
# from an OCI registry (distribution, the file pushed as an ORAS artifact) against `oras pull`.
# Best of 3 runs each; peak RSS of the mover from /usr/bin/time. Then `cargo bench --bench
# mover_streams` (parallel ranged download: curl, rclone x8, mover x1 and x8, throttled and
# not; rclone is built from hack/rclone on first use). Writes
# target/bench/mover.md, which `make bench` puts into docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
size_mib=${BENCH_SIZE_MIB:-1024}
dir=${BENCH_DIR:-.cache/bench}
mkdir -p "$dir/served/templates" "$dir/out"
command -v /usr/bin/time >/dev/null || { apt-get update -qq && apt-get install -y -qq time; }
cargo build --release --quiet --bin templatecache
mover=target/release/templatecache
src="$dir/served/templates/template.img"
if [ "$(stat -c %s "$src" 2>/dev/null || echo 0)" != $((size_mib << 20)) ]; then
  head -c $((size_mib << 20)) /dev/urandom > "$src"
fi
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
http_port=$(port); s3_port=$(port)
python3 -m http.server "$http_port" --bind 127.0.0.1 --directory "$dir/served/templates" >/dev/null 2>&1 &
http_pid=$!
s3=$(hack/s3/build.sh)
"$s3" --access bench --secret bench-secret --port "127.0.0.1:$s3_port" posix "$dir/served" >/dev/null 2>&1 &
s3_pid=$!
# The registry without auth: one token or basic-auth exchange per pull costs nothing at this size.
registry=$(hack/registry/build.sh)
oras=$(hack/oras/build.sh)
registry_port=$(port)
rm -rf "$dir/registry"
mkdir -p "$dir/registry"
printf 'version: 0.1\nlog: {level: error}\nstorage: {filesystem: {rootdirectory: %s}}\nhttp: {addr: 127.0.0.1:%s}\n' \
  "$(cd "$dir/registry" && pwd)" "$registry_port" > "$dir/registry.yml"
OTEL_TRACES_EXPORTER=none "$registry" serve "$dir/registry.yml" >/dev/null 2>&1 &
registry_pid=$!
trap 'kill $http_pid $s3_pid $registry_pid 2>/dev/null' EXIT
sleep 1
oci_ref="127.0.0.1:$registry_port/bench/template:v1"
(cd "$dir/served/templates" && HOME="$dir" "$oras" push --plain-http "$oci_ref" template.img >/dev/null)

# best SECONDS_VAR RSS_VAR -- command...: best wall time (and the mover's peak RSS) of 3 runs.
best() {
  local best_s=999999 best_rss=0 i out
  for i in 1 2 3; do
    rm -f "$dir/out/"*
    out=$(/usr/bin/time -f '%e %M' "$@" 2>&1 >/dev/null | tail -1)
    read -r s rss <<<"$out"
    if [ "$(cat "$dir/out/"*.img | wc -c)" != $((size_mib << 20)) ]; then
      echo "bench: '$*' did not copy the whole file: $out" >&2; exit 1
    fi
    if awk "BEGIN{exit !($s < $best_s)}"; then best_s=$s; fi
    [ "$rss" -gt "$best_rss" ] && best_rss=$rss
  done
  echo "$best_s $best_rss"
}
url="http://127.0.0.1:$http_port/template.img"
read -r curl_http _ <<<"$(best curl -sS -o "$dir/out/curl.img" "$url")"
read -r mover_http rss_http <<<"$(best "$mover" copy --attempt 1 --dest "$dir/out/mover.img" --http-url "$url" --allow-internal-address "127.0.0.1:$http_port")"
s3url="http://127.0.0.1:$s3_port/templates/template.img"
read -r curl_s3 _ <<<"$(best curl -sS --aws-sigv4 aws:amz:us-east-1:s3 --user bench:bench-secret -H "x-amz-content-sha256: UNSIGNED-PAYLOAD" -o "$dir/out/curl.img" "$s3url")"
read -r mover_s3 rss_s3 <<<"$(AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench-secret best "$mover" copy --attempt 1 --dest "$dir/out/mover.img" --s3-bucket templates --s3-key template.img --s3-endpoint "http://127.0.0.1:$s3_port" --allow-internal-address "127.0.0.1:$s3_port")"
read -r oras_oci _ <<<"$(HOME="$dir" best "$oras" pull --plain-http -o "$dir/out" "$oci_ref")"
read -r mover_oci rss_oci <<<"$(best "$mover" copy --attempt 1 --dest "$dir/out/mover.img" --oci-reference "$oci_ref" --oci-plain-http --allow-internal-address "127.0.0.1:$registry_port")"
# The floor no mover can beat: SHA-256 of the same file from the page cache, on one core.
hash_s=999999
for i in 1 2 3; do
  t=$(/usr/bin/time -f '%e' openssl dgst -sha256 "$src" 2>&1 >/dev/null | tail -1)
  if awk "BEGIN{exit !($t < $hash_s)}"; then hash_s=$t; fi
done
mibs() { awk "BEGIN{printf \"%.0f\", $size_mib / $1}"; }
ratio() { awk "BEGIN{printf \"%.2f\", $2 / $1}"; }
# The highest ratio any mover that hashes every byte could reach: one SHA-256 stream cannot be
# split over cores, so no such mover is faster than the hash alone.
bound() { awk "BEGIN{r = $1 / $hash_s; printf \"%.2f\", r < 1 ? r : 1}"; }
mkdir -p target/bench
cat > target/bench/mover.md <<MD
## Data mover

\`bash hack/bench-mover.sh\` (also \`make bench\`), $(date -u +%Y-%m-%d), this machine: $(nproc) cores.
One ${size_mib} MiB file of random bytes on loopback, best of 3 runs each. The mover streams into
a partial file, SHA-256 hashes every byte, fsyncs and renames; curl only writes the file; oras
pull checks the blob's digest too. The OCI mover reads one stream (a registry blob has no parts
to fetch in parallel here), hashing it as it reads, and writes on another thread.

| source | reference | reference MiB/s | mover MiB/s | mover / reference | bound set by SHA-256 | mover peak RSS |
|---|---|---|---|---|---|---|
| HTTP (python http.server) | \`curl -o\` | $(mibs "$curl_http") | $(mibs "$mover_http") | $(ratio "$mover_http" "$curl_http") | $(bound "$curl_http") | $((rss_http / 1024)) MiB |
| S3 (versitygw) | \`curl --aws-sigv4 -o\` | $(mibs "$curl_s3") | $(mibs "$mover_s3") | $(ratio "$mover_s3" "$curl_s3") | $(bound "$curl_s3") | $((rss_s3 / 1024)) MiB |
| OCI registry (distribution, ORAS artifact) | \`oras pull\` | $(mibs "$oras_oci") | $(mibs "$mover_oci") | $(ratio "$mover_oci" "$oras_oci") | $(bound "$oras_oci") | $((rss_oci / 1024)) MiB |

Targets: at least 0.9 of the reference's throughput with checksumming on; under 64 MiB peak RSS.

SHA-256 alone (\`openssl dgst -sha256\`, SHA-NI, one core) runs at $(mibs "$hash_s") MiB/s here;
"bound set by SHA-256" is that rate over the reference's, the most any mover that hashes every
byte could reach on this machine.
The mover reads, hashes and writes on three threads so it goes as fast as the slowest stage, and
asks the kernel to flush every 64 MiB so the final fsync is short. The slowest stage is SHA-256:
one stream's hash cannot be spread over cores, so where the bound column is below a target, no
hashing mover can reach it on that machine. Against python's http.server the server also takes a
core, leaving the mover less than the rest to read, hash and write.
MD
cargo bench --quiet --bench mover_streams >/dev/null
{ echo; cat target/bench/mover-streams.md; } >> target/bench/mover.md
cat target/bench/mover.md
