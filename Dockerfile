# syntax=docker/dockerfile:1
# One image with every Switchyard binary (collector, registry, users, catalog, inventory, payments,
# orders, notifications, gateway, loadgen);
# docker-compose.yml runs one of them per service through `command`.

FROM rust:1-bookworm AS builder
WORKDIR /src
COPY . .
# The cache mounts keep downloaded crates and build artefacts between builds. The target folder
# is a cache, not part of the image, so the binaries are copied out of it.
# The dashboard's browser half (wasm, JS glue, CSS) is built here too, with ui/build.sh, which
# adds the wasm32 target and the matching wasm-bindgen-cli; without npm in this image it skips
# wasm-opt (a larger wasm that works: Debian's wasm-opt is never used, it breaks hydration).
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bins \
 && ui/build.sh --release \
 && mkdir -p /out/bin /out/site \
 && cp -r target/site/pkg /out/site/ \
 && cp target/release/collector target/release/registry target/release/users \
       target/release/catalog target/release/inventory target/release/payments target/release/orders \
       target/release/notifications target/release/gateway target/release/loadgen /out/bin/

FROM debian:bookworm-slim
# ca-certificates for HTTPS exporters, curl for the healthchecks.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/*
# /data holds the SQLite databases; a named volume mounted there starts with this ownership.
RUN useradd --system --uid 10001 --user-group --home-dir /data --no-create-home switchyard \
 && mkdir /data \
 && chown switchyard:switchyard /data
COPY --from=builder /out/site /usr/share/switchyard/site
COPY --from=builder /out/bin/ /usr/local/bin/
# The collector serves the dashboard's files from here.
ENV COLLECTOR_UI_DIR=/usr/share/switchyard/site
USER switchyard
WORKDIR /data
# collector: OTLP gRPC, OTLP HTTP, query API; registry; gateway; users and catalog in compose.
EXPOSE 4317 4318 16686 8500 8080 9000
CMD ["collector", "--db", "/data/collector.db"]
