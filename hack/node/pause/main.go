// pause: the Pod sandbox process of the local node. No registry is reachable here, so this
// stands in for registry.k8s.io/pause: it holds the sandbox's namespaces and exits on SIGTERM
// or SIGINT. Built static (CGO_ENABLED=0) so the image needs nothing else.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	c := make(chan os.Signal, 1)
	signal.Notify(c, syscall.SIGTERM, syscall.SIGINT)
	<-c
}
