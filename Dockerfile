# lmq-gateway image: build in the full Rust image (C toolchain, make, perl and OpenSSL headers
# for the bundled C libraries: mimalloc, ring, librdkafka), run on debian-slim as a non-root user.
#
#   docker build -t lmq-gateway .
#   docker run -p 1883:1883 lmq-gateway            # embedded core service, shipped gateway.yaml
#
# Mount another configuration and point LMQ_CONFIG at it (docker-compose.yml does).

FROM rust:1-bookworm AS builder
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
# A workspace member: cargo reads its manifest even when building the gateway alone.
COPY bench ./bench
COPY web ./web
RUN cargo build --release --locked --bin lmq-gateway \
    && cp target/release/lmq-gateway /usr/local/bin/lmq-gateway \
    && strip /usr/local/bin/lmq-gateway

FROM debian:bookworm-slim
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 lmq \
    && useradd --system --uid 10001 --gid lmq --home-dir /var/lib/lmq-gateway --shell /usr/sbin/nologin lmq \
    && mkdir -p /var/lib/lmq-gateway /etc/lmq-gateway \
    && chown lmq:lmq /var/lib/lmq-gateway
COPY --from=builder /usr/local/bin/lmq-gateway /usr/local/bin/lmq-gateway
COPY gateway.yaml /etc/lmq-gateway/gateway.yaml
ENV LMQ_CONFIG=/etc/lmq-gateway/gateway.yaml
# The embedded core service keeps its data under the working directory (`data/`).
WORKDIR /var/lib/lmq-gateway
USER 10001:10001
EXPOSE 1883 8883 8083 8084 8080
# Probes the admin API's /healthz when the configuration enables it, else the MQTT listener.
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 CMD ["lmq-gateway", "healthcheck"]
ENTRYPOINT ["lmq-gateway"]
CMD ["serve"]
