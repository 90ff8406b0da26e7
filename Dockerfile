# syntax=docker/dockerfile:1
#
# dsreg: the registry's release binary on Debian bookworm-slim, run as an unprivileged user.
#
#   docker build -t dsreg .
#   docker run --rm dsreg --help
#
# The image has no PostgreSQL server, so `serve` needs DATABASE_URL (see docker-compose.yml).
# Ports: 8080 HTTP (/healthz, /readyz, /metrics, webhook ingest), 50051 gRPC.

# The toolchain matches `rust-version` in Cargo.toml.
ARG RUST_VERSION=1.92

FROM rust:${RUST_VERSION}-slim-bookworm AS build
WORKDIR /src
COPY . .
# proto/ is compiled by protox (pure Rust), so no protoc is needed; `ring` needs only the C
# compiler the rust image already has. The cache mounts keep downloaded crates and compiled
# dependencies between builds; the binary is copied out because target/ is a cache mount.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin dsreg \
    && install -m 0755 target/release/dsreg /usr/local/bin/dsreg

FROM debian:bookworm-slim AS runtime
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
# A fixed numeric uid, so orchestrators can check "not root" without reading /etc/passwd.
# /var/lib/dsreg is the data folder (grpc.addr); /var/lib/dsreg/secrets is where compose puts
# the signing secret and master keys (a volume mounted there starts with this owner and mode).
RUN groupadd --system --gid 10001 dsreg \
    && useradd --system --uid 10001 --gid dsreg --home-dir /var/lib/dsreg \
       --shell /usr/sbin/nologin dsreg \
    && install -d -o dsreg -g dsreg -m 0700 /var/lib/dsreg /var/lib/dsreg/secrets
COPY --from=build /usr/local/bin/dsreg /usr/local/bin/dsreg
ENV DSREG_DATA_DIR=/var/lib/dsreg \
    DSREG_HTTP_ADDR=0.0.0.0:8080 \
    DSREG_GRPC_ADDR=0.0.0.0:50051
WORKDIR /var/lib/dsreg
USER 10001:10001
EXPOSE 8080 50051
# SIGTERM stops every worker within its deadline, writes final states and exits 0. `docker stop`
# kills after 10 s unless given longer (compose: stop_grace_period): keep that above
# DSREG_SHUTDOWN_GRACE_MS.
STOPSIGNAL SIGTERM
ENTRYPOINT ["dsreg"]
CMD ["serve"]
