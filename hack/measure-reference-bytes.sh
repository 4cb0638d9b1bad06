#!/usr/bin/env bash
# Bytes a reference adds to a TemplateCache, per patch strategy, measured on the local control
# plane (compact JSON of the object as stored, managedFields included). Usage:
#   hack/measure-reference-bytes.sh [references]   (default 50)
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-50}
k() { .cluster/kubectl --kubeconfig .cluster/kubeconfig "$@"; }
ns=refbytes-$$
k create namespace "$ns" >/dev/null
size() { k -n "$ns" get tc "$1" -o json --show-managed-fields | python3 -c 'import json,sys; print(len(json.dumps(json.load(sys.stdin), separators=(",",":"))))'; }
make_cache() {
  printf 'apiVersion: templatecache.io/v1alpha1\nkind: TemplateCache\nmetadata: {name: %s, finalizers: [templatecache.io/cleanup]}\nspec: {source: {http: {url: "http://127.0.0.1:9/x"}}}\n' "$1" | k -n "$ns" create -f - >/dev/null
}
make_cache jsonpatch; make_cache ssa
base_j=$(size jsonpatch); base_s=$(size ssa)
for i in $(seq 1 "$n"); do
  id=$(printf 'consumer-%08d-0000-0000-0000-000000000000' "$i")
  k -n "$ns" patch tc jsonpatch --type=json --field-manager=templatecache-client \
    -p "[{\"op\":\"add\",\"path\":\"/metadata/finalizers/-\",\"value\":\"ref.templatecache.io/$id\"}]" >/dev/null
  printf 'apiVersion: templatecache.io/v1alpha1\nkind: TemplateCache\nmetadata: {name: ssa, finalizers: ["ref.templatecache.io/%s"]}\n' "$id" \
    | k -n "$ns" apply --server-side --field-manager "ref-$id" -f - >/dev/null
done
j=$(size jsonpatch); s=$(size ssa)
echo "references: $n (consumer ids of 45 characters, like a UID)"
echo "json-patch append: $(( (j - base_j) / n )) bytes per reference ($base_j -> $j)"
echo "ssa per consumer:  $(( (s - base_s) / n )) bytes per reference ($base_s -> $s)"
k delete namespace "$ns" --wait=false >/dev/null
