# syntax=docker/dockerfile:1
#
# gigastt as a static musl binary on distroless (no shell, no libc, non-root).
#
#   docker build -t gigastt .
#   docker build -t gigastt --build-arg BAKE_MODEL=1 .   # weights inside the image
#   docker run -p 127.0.0.1:9876:9876 -v gigastt-models:/models gigastt
#
# Without BAKE_MODEL the image has no weights; fetch them once into the volume:
#   docker run --rm -v gigastt-models:/models gigastt download --model-dir /models
#
# The container listens on 0.0.0.0 (--bind-all) because Docker's port mapping
# arrives on the container's bridge interface, not its loopback. Keep the
# host side on loopback (-p 127.0.0.1:9876:9876) and put a proxy in front:
# see docs/deployment.md.

ARG RUST_IMAGE=rust:1-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/static-debian12:nonroot

FROM ${RUST_IMAGE} AS build
ARG TARGETARCH
# musl-tools: C code in the dependency tree (ring, tract's kernels) needs musl-gcc.
# Unpinned on purpose: the base image pins the Debian release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends musl-tools \
    && rm -rf /var/lib/apt/lists/*
RUN case "${TARGETARCH:-amd64}" in \
        amd64) echo x86_64-unknown-linux-musl ;; \
        arm64) echo aarch64-unknown-linux-musl ;; \
        *) echo "unsupported TARGETARCH ${TARGETARCH}" >&2; exit 1 ;; \
    esac > /rust-target \
    && rustup target add "$(cat /rust-target)"
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
# The target dir is a cache mount, so copy the binary out in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --target "$(cat /rust-target)" \
    && install -D -m 0755 "target/$(cat /rust-target)/release/gigastt" /out/gigastt

# BAKE_MODEL=1 downloads and SHA-256-checks the weights at build time (about
# 900 MB); otherwise /models starts empty and is filled through the volume.
ARG BAKE_MODEL=0
RUN mkdir -p /models \
    && if [ "$BAKE_MODEL" = "1" ]; then /out/gigastt download --model-dir /models; fi

FROM ${RUNTIME_IMAGE}
COPY --from=build /out/gigastt /usr/local/bin/gigastt
# 65532 is distroless's "nonroot" user; it owns the model dir so that
# `gigastt download` can write into a fresh named volume.
COPY --from=build --chown=65532:65532 /models /models
USER 65532:65532
ENV GIGASTT_MODEL_DIR=/models
VOLUME ["/models"]
EXPOSE 9876
# `gigastt health` GETs http://127.0.0.1:9876/health and exits 0 or 1. If you
# change the port, pass it on: HEALTHCHECK CMD ["gigastt","health","--url",...].
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["gigastt", "health"]
ENTRYPOINT ["gigastt"]
CMD ["serve", "--host", "0.0.0.0", "--bind-all"]
