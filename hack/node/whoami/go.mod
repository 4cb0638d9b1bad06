// The consumer image's in-cluster API probe (hack/image.sh); standard library only.
module templatecache.io/hack/node/whoami

go 1.26.0
