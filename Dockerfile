# syntax=docker/dockerfile:1
# meshd as a static (musl) binary in a distroless image:
#   docker build -t meshd .
# The Kubernetes manifests (deploy/) run it as `meshd serve` with user 65532.

# ---- build ------------------------------------------------------------------------------------
FROM rust:1.95-bookworm AS build
ARG TARGET=x86_64-unknown-linux-musl
# musl-gcc compiles the C in aws-lc-sys (pregenerated bindings for this target: its cc builder,
# no cmake, clang or Go needed), mimalloc and psm. Debian's musl-gcc sees no kernel headers, so
# aws-lc's <linux/random.h> probe fails and it would fall back to getentropy(): link linux/, asm/
# and asm-generic/ into musl's include dir to keep its usual Linux entropy source.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends musl-tools \
 && rm -rf /var/lib/apt/lists/* \
 && ln -s /usr/include/linux /usr/include/x86_64-linux-musl/linux \
 && ln -s /usr/include/x86_64-linux-gnu/asm /usr/include/x86_64-linux-musl/asm \
 && ln -s /usr/include/asm-generic /usr/include/x86_64-linux-musl/asm-generic \
 && rustup target add "$TARGET"
ENV CC_x86_64_unknown_linux_musl=musl-gcc \
    CARGO_TARGET_X86_64_UNKNOWN_LINUX_MUSL_RUSTFLAGS="-C target-feature=+crt-static"
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --target "$TARGET" --bin meshd \
 && install -D -m 0755 "target/$TARGET/release/meshd" /out/meshd
# Refuse anything but a static executable.
RUN ! ldd /out/meshd 2>/dev/null | grep -q '=>'

# ---- runtime ----------------------------------------------------------------------------------
FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /out/meshd /meshd
USER 65532:65532
# 15010 plaintext gRPC, 15012 TLS gRPC (CA, ADS), 15014 monitoring, 15017 webhooks, 8080 /ready
EXPOSE 15010 15012 15014 15017 8080
ENTRYPOINT ["/meshd"]
CMD ["serve"]
