# Inferneo on CPUs. Build: docker build -t inferneo .   Run: docker run -p 8000:8000 inferneo [--model ...]
# The build stage runs the README's install (npm ci builds the engine); the image keeps
# only what serving needs. The engine is built for portable CPU levels (x86-64-v3: AVX2 and
# FMA, any x86 server since 2015; and AVX-512 ones), not for the build host's CPU.
FROM node:20-bookworm-slim AS build
WORKDIR /app
# One engine build per CPU level; the server loads the richest one the host runs
# (a Q4 decode without VNNI is several times slower). --build-arg INFERNEO_CPU=LEVEL[,LEVEL...] to change.
ARG INFERNEO_CPU=x86_64_v3,x86_64_v4+avx512vnni,x86_64_v4+avx512vnni+avx512bf16
ENV INFERNEO_CPU=${INFERNEO_CPU}
COPY package.json package-lock.json build.zig ./
COPY scripts ./scripts
COPY engine ./engine
RUN npm ci --no-audit --no-fund
COPY bin ./bin
COPY src ./src
COPY assets ./assets
# Serving needs Bun and the runtime packages; not Zig, the test tools or the dev packages.
RUN npm prune --omit=dev --no-audit --no-fund && rm -rf node_modules/@ryoppippi .zig-cache

FROM debian:bookworm-slim
RUN useradd --uid 10001 --create-home --shell /usr/sbin/nologin inferneo
WORKDIR /app
COPY --from=build /app/package.json ./
COPY --from=build /app/node_modules ./node_modules
COPY --from=build /app/zig-out ./zig-out
COPY --from=build /app/bin ./bin
COPY --from=build /app/src ./src
COPY --from=build /app/assets ./assets
ENV HF_HOME=/cache/huggingface
RUN mkdir -p /models /cache && chown inferneo /models /cache
VOLUME ["/models", "/cache"]
USER 10001
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=600s --retries=3 \
  CMD ["/app/node_modules/.bin/bun", "-e", "fetch('http://127.0.0.1:8000/health').then((r) => process.exit(r.ok ? 0 : 1), () => process.exit(1))"]
ENTRYPOINT ["/app/bin/inferneo", "serve", "--host", "0.0.0.0", "--port", "8000"]
