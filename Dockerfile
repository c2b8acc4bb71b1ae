# syntax=docker/dockerfile:1
#
# The ingest image: `ingest` (migrate, consume, gateway, provision, status)
# and `loadgen`, on distroless cc-debian12 as its nonroot user (65532).
#
#   docker build -t ingest:$(cargo metadata --no-deps --format-version 1 | jq -r '.packages[0].version') .
#
# The binaries need only glibc, libm and libgcc_s at run time (TLS is
# rustls with aws-lc, linked statically; CA certificates come from the
# image's /etc/ssl/certs), which is what the cc image has.
# tests/tests/image.rs (the_image_premise_holds) checks that premise
# without a container runtime: it runs the binary in a chroot holding only
# those libraries, as a non-root user.

# --- build: Rust on Debian 12 (bookworm), the runtime's Debian --------------
FROM rust:1.90-bookworm AS build
# aws-lc-sys compiles C with cc, and cmake when it has no prebuilt bindings.
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# Caches keep the registry and the build between image builds.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin ingest --bin loadgen \
 && mkdir -p /out \
 && cp target/release/ingest target/release/loadgen /out/

# --- runtime: glibc, libgcc_s, CA certificates, a nonroot user, nothing else --
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/ingest /out/loadgen /usr/local/bin/
# 65532:65532, as the chart's securityContext says (runAsNonRoot needs a number).
USER 65532:65532
# The consumer's and the gateway's metrics; CoAP.
EXPOSE 9464/tcp 9465/tcp 5683/udp
ENTRYPOINT ["ingest"]
CMD ["--help"]
