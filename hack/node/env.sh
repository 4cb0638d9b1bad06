# The local node's fixed names and addresses, sourced by hack/cluster.sh and hack/node.sh.
# The node's address is on a bridge this project creates (tccni0): the CNI bridge plugin uses the
# same bridge as the Pods' gateway, so the API server, the kubelet, the registry and the Pods
# talk over one host-only interface and nothing binds to or targets an external address.
NODE_NAME=templatecache-node
NODE_BRIDGE=tccni0
NODE_IP=10.88.0.1
POD_CIDR=10.88.0.0/22
SERVICE_CIDR=10.0.0.0/24
# A fixed name for the node's registry, whatever port it got: containerd sends pulls of
# registry.templatecache.local/... to it (certs.d), so examples/local/ can name images.
REGISTRY_ALIAS=registry.templatecache.local
# The name containerd v2.4.2 pins as its sandbox image; hack/node.sh imports its own pause there.
SANDBOX_IMAGE=registry.k8s.io/pause:3.10.2
