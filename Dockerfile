# One image holds both binaries; compose picks the command.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bins -p inferq-api -p inferq-worker

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 inferq
COPY --from=build /src/target/release/inferq-api /src/target/release/inferq-worker /usr/local/bin/
USER inferq
EXPOSE 8080
CMD ["inferq-api"]
