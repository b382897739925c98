# anteroom: admission control in front of an OpenAI-compatible model server.
#
#   docker build -t anteroom .
#   docker run --rm -p 8080:8080 \
#     -v "$PWD/deploy/anteroom.toml:/etc/anteroom/anteroom.toml:ro" anteroom
#
# Build stage: the same cargo command CI builds with (tests/container.rs
# checks that the two stay the same).
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked && cp target/release/anteroom /anteroom

# Runtime: distroless (glibc, CA-free: webpki roots are compiled in), no
# shell, running as the unprivileged "nonroot" user (uid 65532).
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /anteroom /usr/local/bin/anteroom
COPY deploy/anteroom.toml /etc/anteroom/anteroom.toml
USER nonroot:nonroot
# 8080: the proxy (clients' base URL); 8081: /healthz, /status, /metrics
# (on loopback in the shipped config: bind it out with admin_key_env set).
EXPOSE 8080 8081
HEALTHCHECK --interval=10s --timeout=4s --start-period=5s --retries=3 \
    CMD ["/usr/local/bin/anteroom", "healthcheck", "--url", "http://127.0.0.1:8081/healthz"]
# SIGTERM drains (drain_timeout, 25 s by default): give it the time.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/anteroom"]
CMD ["serve", "--config", "/etc/anteroom/anteroom.toml", "--log-format", "json"]
