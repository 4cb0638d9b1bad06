// The local node's sandbox (pause) program; standard library only.
module templatecache.io/hack/node/pause

go 1.26.0
