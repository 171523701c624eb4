# ifmatch container image: build with the Rust toolchain, run on a small Debian base as a
# non-root user. The config is read from /etc/ifmatch/ifmatch.toml (mount your own; the
# default is config/example.toml). No health-check tool is baked in: probe the admin port
# (/healthz, /readyz) from the orchestrator, as config/kubernetes/pod.yaml does.
#
#   docker build -t ifmatch .
#   docker run --rm -p 8080:8080 ifmatch --demo --listen 0.0.0.0:8080    # see it work at once
#   docker run --rm -p 8080:8080 -p 9901:9901 -v $PWD/my.toml:/etc/ifmatch/ifmatch.toml:ro ifmatch
# (config/example.toml's upstream is 127.0.0.1:9000: in a container of its own that is the
# container itself. Run it beside its backend, sharing the network namespace, as
# config/compose/compose.yaml and config/kubernetes/pod.yaml do.)

FROM rust:1-slim-bookworm AS build
WORKDIR /src
# Dependencies first, so that source edits do not rebuild them. Cargo reads every target
# Cargo.toml declares, the [[bench]]es among them, before it builds anything: their files
# must be here too (they are not built).
COPY Cargo.toml Cargo.lock ./
# Build flags (`--cfg tokio_unstable`, for src/runtime.rs: without it the tail is longer).
COPY .cargo ./.cargo
COPY benches ./benches
RUN mkdir src && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
    && cargo build --release --locked \
    && rm -rf src
COPY src ./src
RUN touch src/main.rs src/lib.rs && cargo build --release --locked

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin ifmatch
COPY --from=build /src/target/release/ifmatch /usr/local/bin/ifmatch
COPY config/example.toml /etc/ifmatch/ifmatch.toml
USER 10001:10001
ENV IFMATCH_CONFIG=/etc/ifmatch/ifmatch.toml
# 8080: the proxy; 9901: the admin listener (/healthz, /readyz, /metrics) for probes.
EXPOSE 8080 9901
ENTRYPOINT ["/usr/local/bin/ifmatch"]
CMD ["--config", "/etc/ifmatch/ifmatch.toml"]
