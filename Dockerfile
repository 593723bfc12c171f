# Multi-stage build: compile in the Rust image, run from a slim Debian image as a non-root user.
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
# Dependencies first, so source edits do not rebuild them.
COPY Cargo.toml Cargo.lock ./
COPY benches benches
RUN mkdir src && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
    && cargo build --release --locked --bin edgeplex \
    && rm -rf src
COPY src src
RUN touch src/main.rs src/lib.rs && cargo build --release --locked --bin edgeplex

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --home-dir /var/lib/edgeplex --create-home edgeplex
COPY --from=build /src/target/release/edgeplex /usr/local/bin/edgeplex
COPY config/edgeplex.toml /etc/edgeplex/edgeplex.toml
USER edgeplex
WORKDIR /var/lib/edgeplex
# Inside a container the public listener must face the container's interfaces. The admin
# listener (plain HTTP, no authentication: /metrics, /v1/admission/*) keeps its default,
# 127.0.0.1:9090 inside the container, so no port mapping exposes it by accident; a scraper on a
# private network gets it with -e EDGEPLEX__SERVER__ADMIN_LISTEN=0.0.0.0:9090 and a port published
# on that network only (README, Operating it). A real certificate is mounted and named with
# EDGEPLEX__TLS__CERT and EDGEPLEX__TLS__KEY; without one a dev certificate is made.
ENV EDGEPLEX__SERVER__LISTEN=0.0.0.0:8443 \
    EDGEPLEX__TLS__DEV_CERT_PATH=/var/lib/edgeplex/edgeplex-dev-cert.pem \
    EDGEPLEX__ADMISSION__ALLOWED_ORIGINS='["https://localhost:8443"]'
# 8443/tcp: HTTP/1.1 and HTTP/2 over TLS; 8443/udp: HTTP/3 and WebTransport. The admin port is
# not exposed: it listens on loopback unless overridden.
EXPOSE 8443/tcp 8443/udp
STOPSIGNAL SIGTERM
ENTRYPOINT ["edgeplex"]
CMD ["serve", "--config", "/etc/edgeplex/edgeplex.toml"]
