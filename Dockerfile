# The operator and data mover image: one binary on a small non-root base. `make image` builds
# the same image without a container engine; `make check-dockerfile` (part of `make test`)
# builds from exactly the files this file copies, so a missing one fails CI, not a user.
FROM rust:1.95-bookworm AS build
WORKDIR /src
# The whole workspace's manifests and sources: cargo reads every member's manifest (and the
# root package's declared benches) even to build one binary. Only the operator's dependencies
# are compiled (`-p templatecache`).
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY crates ./crates
COPY benches ./benches
RUN cargo build --release --locked -p templatecache --bin templatecache

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/templatecache /usr/local/bin/templatecache
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/templatecache"]
CMD ["run"]
