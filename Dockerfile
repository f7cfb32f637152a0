# syntax=docker/dockerfile:1

# ---- build ------------------------------------------------------------------
FROM rust:1.95-bookworm AS builder
WORKDIR /app
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    cargo build --release --bin tally

# ---- runtime ----------------------------------------------------------------
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*

RUN groupadd --system --gid 10001 tally \
 && useradd --system --uid 10001 --gid tally --home-dir /var/lib/tally --shell /usr/sbin/nologin tally \
 && mkdir -p /var/lib/tally \
 && chown tally:tally /var/lib/tally

COPY --from=builder /app/target/release/tally /usr/local/bin/tally

ENV TALLY_DATA_DIR=/var/lib/tally
VOLUME /var/lib/tally
WORKDIR /var/lib/tally
USER tally:tally

EXPOSE 8080
ENTRYPOINT ["tally"]
CMD ["serve"]
