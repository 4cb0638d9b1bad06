# The operator and data mover image: one static-ish binary on a small non-root base.
# (This machine has no Docker engine; the file is kept buildable by `docker build .`.)
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY dev ./dev
COPY examples ./examples
RUN cargo build --release --locked --bin templatecache

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/templatecache /usr/local/bin/templatecache
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/templatecache"]
CMD ["run"]
