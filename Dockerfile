# tokenbroker container image: a locked release build, then a minimal runtime holding only the
# binary, the shared libraries it links, a CA bundle and an unprivileged user (uid 65532).
#
#   docker build --build-arg TOKENBROKER_COMMIT=$(git rev-parse --short HEAD) -t tokenbroker .
#   docker run --read-only -p 8080:8080 -p 9090:9090 \
#     -v /etc/tokenbroker:/etc/tokenbroker:ro -v tokenbroker-state:/var/lib/tokenbroker tokenbroker
#
# The runtime's files are laid out by deploy/image/rootfs.sh, the one file list of the image; the
# image test (tests/image.rs) builds the `runtime` stage below with the same script, from the
# binary the tests use. Mount the config (and its secret files) at /etc/tokenbroker; keep the
# state file under /var/lib/tokenbroker (a volume). Listen on 0.0.0.0 in the config to be reached.

FROM docker.io/library/rust:1-bookworm AS build
WORKDIR /src
COPY . .
# No .git in the build context: the commit for `--version` comes from here.
ARG TOKENBROKER_COMMIT=unknown
ENV TOKENBROKER_COMMIT=${TOKENBROKER_COMMIT}
RUN cargo build --release --locked --bin tokenbroker \
 && deploy/image/rootfs.sh target/release/tokenbroker /rootfs

FROM scratch AS runtime
COPY --from=build /rootfs/ /
USER 65532:65532
WORKDIR /var/lib/tokenbroker
# 8080 proxy (plain), 8443 proxy (TLS), 9090 admin (/healthz, /readyz, /metrics, /tokens).
EXPOSE 8080 8443 9090
ENTRYPOINT ["/usr/local/bin/tokenbroker"]
CMD ["run", "--config", "/etc/tokenbroker/tokenbroker.toml"]
