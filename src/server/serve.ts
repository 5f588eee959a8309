// `inferneo serve`: flags and an optional YAML config file (flags win), start-up
// report, and a graceful drain on SIGTERM/SIGINT.
import { existsSync } from "node:fs";
import { availableParallelism, cpus } from "node:os";
import { parseArgs } from "node:util";
import { DEFAULT_ENGINE_OPTIONS, LLMEngine, type EngineOptions } from "../engine/llm_engine.ts";
import {
  argOptions,
  ConfigError,
  ENGINE_USAGE,
  engineOptionsOf,
  FLAGS,
  readConfigFile,
  valuesFromArgs,
  type Key,
  type Values,
} from "../flags.ts";
import { libraryBuild } from "../ffi/native.ts";
import { loadModel } from "../model/load.ts";
import { EMBEDDED_MODEL, EMBEDDED_MODEL_NAME } from "../model/resolve.ts";
import { parseRateLimit } from "./auth.ts";
import { createApp, DEFAULT_SERVER_OPTIONS, ServerState, VERSION, type ServerOptions } from "./app.ts";

export { ConfigError } from "../flags.ts";

export const SERVE_USAGE = `usage: inferneo serve [--model <hf folder | file.gguf | org/name>] [options]
  (without --model: the embedded stories260K demo model)
  --host H (default 127.0.0.1)   --port P (default 8000)   --config config.yaml
  --served-model-name NAME       the name clients send (default: the --model string)
  --api-key KEY (repeatable; or INFERNEO_API_KEY)  --protect-metrics
  --rate-limit 60/min  --rate-limit-tokens N (per minute, per key)
  --drain-timeout S (default 30)  --max-body-bytes 8MiB  --max-header-bytes 32KiB
  --max-seqs-per-request N (prompts x n of one request; default 256)
  --allowed-origins ORIGIN (repeatable, or *: browser pages allowed to call; default none)
  --metrics-prefix inferneo|vllm (vllm: /metrics under vLLM's names, for routers and the
      inference gateway's endpoint picker)   --ssl-certfile F --ssl-keyfile F (HTTPS)
Config files use the same names in snake_case; flags override the file. A relative
model path in a config file is taken from the file's folder when it exists there.

${ENGINE_USAGE}`;

export function parseServeArgs(argv: string[], env: NodeJS.ProcessEnv = process.env): Values & { help?: boolean } {
  const options = {
    config: { type: "string" as const },
    help: { type: "boolean" as const, short: "h" },
    ...argOptions(Object.keys(FLAGS) as Key[]),
  };
  let parsed;
  try {
    parsed = parseArgs({ args: argv, options, strict: true, allowPositionals: false }).values as Record<
      string,
      unknown
    >;
  } catch (e) {
    throw new ConfigError((e as Error).message);
  }
  if (parsed.help) return { help: true };
  const fromFile = typeof parsed.config === "string" ? readConfigFile(parsed.config) : {};
  const fromFlags = valuesFromArgs(parsed, Object.keys(FLAGS) as Key[]);
  const values: Values = { ...fromFile, ...fromFlags };
  if (values.api_key === undefined && env.INFERNEO_API_KEY)
    values.api_key = env.INFERNEO_API_KEY.split(",").filter(Boolean);
  return values;
}

export interface ServeConfig {
  model: string;
  tls: { certFile: string; keyFile: string } | null; // HTTPS (and wss) when set
  host: string;
  port: number;
  drainTimeoutS: number;
  engine: Partial<EngineOptions>;
  server: ServerOptions;
  notes: string[]; // what was asked that this build does not do, said at start
}

export function serveConfig(v: Values): ServeConfig {
  const notes: string[] = [];
  if (v.model === undefined) {
    v = { ...v, model: EMBEDDED_MODEL, served_model_name: v.served_model_name ?? EMBEDDED_MODEL_NAME };
    notes.push(
      `no --model given: serving the embedded ${EMBEDDED_MODEL_NAME} demo model (260K parameters, tiny stories); pass --model for a real one`,
    );
  }
  if (typeof v.model !== "string") throw new ConfigError("--model must be a path or a hub id");
  if (typeof v.tensor_parallel_size === "number" && v.tensor_parallel_size > 1) {
    throw new ConfigError(
      `tensor_parallel_size ${v.tensor_parallel_size} needs several GPUs; this build runs on one CPU process (use 1)`,
    );
  }
  const engine: Partial<EngineOptions> = {
    servedModelName: (v.served_model_name as string) ?? v.model,
    ...engineOptionsOf(v),
  };
  if (v.metrics_prefix !== undefined) {
    if (v.metrics_prefix !== "inferneo" && v.metrics_prefix !== "vllm")
      throw new ConfigError(`metrics_prefix must be inferneo or vllm, got '${String(v.metrics_prefix)}'`);
    engine.metricsPrefix = v.metrics_prefix;
  }
  if ((v.ssl_certfile === undefined) !== (v.ssl_keyfile === undefined))
    throw new ConfigError("--ssl-certfile and --ssl-keyfile go together");
  for (const f of [v.ssl_certfile, v.ssl_keyfile]) {
    if (typeof f === "string" && !existsSync(f)) throw new ConfigError(`${f} does not exist`);
  }
  let rateLimit = null;
  if (v.rate_limit !== undefined || v.rate_limit_tokens !== undefined) {
    let r = { requests: Number.MAX_SAFE_INTEGER, windowMs: 60_000 };
    if (typeof v.rate_limit === "string") {
      try {
        r = parseRateLimit(v.rate_limit);
      } catch (e) {
        throw new ConfigError((e as Error).message);
      }
    }
    rateLimit = { ...r, tokensPerMinute: (v.rate_limit_tokens as number | undefined) ?? null };
  }
  return {
    model: v.model,
    tls:
      typeof v.ssl_certfile === "string" && typeof v.ssl_keyfile === "string"
        ? { certFile: v.ssl_certfile, keyFile: v.ssl_keyfile }
        : null,
    host: (v.host as string) ?? "127.0.0.1",
    port: (v.port as number) ?? 8000,
    drainTimeoutS: (v.drain_timeout as number) ?? 30,
    engine,
    server: {
      ...DEFAULT_SERVER_OPTIONS,
      servedModelName: engine.servedModelName!,
      apiKeys: (v.api_key as string[]) ?? [],
      protectMetrics: (v.protect_metrics as boolean) ?? false,
      rateLimit,
      maxBodyBytes: (v.max_body_bytes as number) ?? DEFAULT_SERVER_OPTIONS.maxBodyBytes,
      maxHeaderBytes: (v.max_header_bytes as number) ?? DEFAULT_SERVER_OPTIONS.maxHeaderBytes,
      maxSeqsPerRequest: (v.max_seqs_per_request as number) ?? DEFAULT_SERVER_OPTIONS.maxSeqsPerRequest,
      allowedOrigins: (v.allowed_origins as string[]) ?? [],
    },
    notes,
  };
}

/** Reads the weight files once with a progress bar: pages them in, so the first request is not slow. */
async function warmWeights(files: string[], log: (line: string) => void): Promise<void> {
  const total = files.reduce((a, f) => a + Bun.file(f).size, 0);
  let done = 0;
  const tty = process.stderr.isTTY && log === stderrLog;
  for (const f of files) {
    for await (const chunk of Bun.file(f).stream()) {
      done += chunk.byteLength;
      if (tty)
        process.stderr.write(
          `\rloading weights [${"#".repeat(Math.round((done / total) * 30)).padEnd(30, ".")}] ${(done / 1e6).toFixed(0)}/${(total / 1e6).toFixed(0)} MB`,
        );
    }
  }
  if (tty) process.stderr.write("\n");
  else log(`loaded weights: ${(total / 1e6).toFixed(1)} MB`);
}

const stderrLog = (line: string) => void process.stderr.write(`${line}\n`);

/** What the engine runs on, as said at start. */
function deviceLine(engine: LLMEngine): string {
  if (engine.native.device === "cpu")
    return `CPU (${cpus()[0]?.model ?? "unknown"}), ${engine.options.threads} of ${availableParallelism()} threads; engine built for ${libraryBuild()}`;
  const d = engine.native.deviceInfo();
  const gib = (b: number) => (b / 2 ** 30).toFixed(1);
  return `CUDA GPU ${d.ordinal}, ${gib(d.memoryTotalBytes)} GiB (weights ${gib(d.weightsBytes)} GiB), ${engine.options.enforceEager ? "eager" : "CUDA graphs for decode"}`;
}

export async function startServer(config: ServeConfig, log: (line: string) => void = stderrLog) {
  const state = new ServerState();
  const app = createApp(state, config.server);
  try {
    const tls = config.tls ? { tls: { cert: Bun.file(config.tls.certFile), key: Bun.file(config.tls.keyFile) } } : {};
    app.listen({
      hostname: config.host,
      port: config.port,
      idleTimeout: 255,
      maxRequestBodySize: config.server.maxBodyBytes + 1024 * 1024,
      ...tls,
    });
  } catch (e) {
    throw new ConfigError(`cannot listen on ${config.host}:${config.port}: ${(e as Error).message}`);
  }
  const url = `${config.tls ? "https" : "http"}://${config.host === "0.0.0.0" ? "127.0.0.1" : config.host}:${app.server!.port}`;
  log(`inferneo ${VERSION}: listening on ${url} (loading ${config.model}; /health answers 503 until ready)`);
  for (const note of config.notes) log(`note: ${note}`);
  let engine: LLMEngine;
  try {
    const model = await loadModel(config.model, config.engine.loadFormat);
    await warmWeights(model.spec.files, log);
    engine = new LLMEngine(model, { ...DEFAULT_ENGINE_OPTIONS, ...config.engine });
  } catch (e) {
    await app.stop(true);
    throw e;
  }
  state.ready(engine, config.server);
  const c = engine.model.spec.config;
  const kvBytes = engine.native.kvCacheBytes;
  log(
    `model: ${config.server.servedModelName} (${c.numLayers} layers, hidden ${c.hiddenSize}, ${c.numHeads} heads / ${c.numKvHeads} KV heads, vocab ${c.vocabSize}), weights ${engine.model.spec.dtype}, products ${engine.options.computeDtype === "bf16" ? "bf16 (--dtype bfloat16)" : "f32"}`,
  );
  if (engine.deviceNote) log(`note: ${engine.deviceNote}`);
  log(`device: ${deviceLine(engine)}`);
  if (engine.native.device === "cpu" && config.engine.gpuMemoryUtilization !== undefined)
    log(
      `note: gpu_memory_utilization ${config.engine.gpuMemoryUtilization} has no effect on the CPU; the KV pool is sized by --kv-cache-memory`,
    );
  log(
    `KV cache: ${engine.numBlocks} blocks x ${engine.options.blockSizeTokens} tokens = ${engine.numBlocks * engine.options.blockSizeTokens} tokens, ${(kvBytes / 2 ** 20).toFixed(1)} MiB ${engine.kvCacheDtype}; max model len ${engine.maxModelLen}; prefix caching ${engine.options.enablePrefixCaching ? "on" : "off"}`,
  );
  log(`ready: ${url}/v1  docs: ${url}/docs${config.server.apiKeys.length > 0 ? "  (API key required)" : ""}`);

  let stopping: Promise<void> | null = null;
  const stop = (signal: string) => {
    stopping ??= (async () => {
      log(`${signal}: draining (no new requests; ${engine.numUnfinished} in flight, up to ${config.drainTimeoutS} s)`);
      state.status = "draining";
      const deadline = Date.now() + config.drainTimeoutS * 1000;
      while (engine.numUnfinished > 0 && Date.now() < deadline) await Bun.sleep(50);
      if (engine.numUnfinished > 0) log(`drain timeout: aborting ${engine.numUnfinished} requests`);
      await engine.shutdown();
      state.service?.tokenizerThread.terminate();
      // Let responses still being written reach their clients, then close what is left.
      const graceful = app.stop(false).then(
        () => true,
        () => true,
      );
      if (!(await Promise.race([graceful, Bun.sleep(2000).then(() => false)]))) await app.stop(true).catch(() => {});
      log("stopped");
    })();
    return stopping;
  };
  return { app, state, engine, url, stop };
}

export async function serve(argv: string[]): Promise<number> {
  let config: ServeConfig;
  try {
    const values = parseServeArgs(argv);
    if ("help" in values && values.help) {
      process.stdout.write(SERVE_USAGE);
      return 0;
    }
    config = serveConfig(values);
  } catch (e) {
    if (e instanceof ConfigError) {
      process.stderr.write(`inferneo serve: ${e.message}\n`);
      return 2;
    }
    throw e;
  }
  let server: Awaited<ReturnType<typeof startServer>>;
  try {
    server = await startServer(config);
  } catch (e) {
    if (e instanceof ConfigError) {
      process.stderr.write(`inferneo serve: ${e.message}\n`);
      return 2;
    }
    throw e;
  }
  await new Promise<void>((resolve) => {
    const onSignal = (signal: string) => void server.stop(signal).then(resolve);
    process.once("SIGTERM", () => onSignal("SIGTERM"));
    process.once("SIGINT", () => onSignal("SIGINT"));
  });
  return 0;
}
