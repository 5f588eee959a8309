// The engine's and the server's options, one table for flags and config files: every
// option by its config-file key (snake_case; the flag is the same in kebab-case) and how
// its value is read. `inferneo serve` reads all of them, `inferneo generate` the engine's.
import { existsSync, readFileSync } from "node:fs";
import { dirname, isAbsolute, resolve } from "node:path";
import YAML from "yaml";
import { computeDtypeOf, type EngineOptions } from "./engine/llm_engine.ts";

export class ConfigError extends Error {}

// Every serve flag, by its config-file key. `kind` says how a value is read.
export const FLAGS = {
  model: "string",
  device: "string",
  host: "string",
  port: "int",
  served_model_name: "string",
  max_model_len: "int",
  max_num_batched_tokens: "int",
  max_num_seqs: "int",
  max_queue_len: "int",
  block_size: "int",
  num_gpu_blocks_override: "int",
  kv_cache_memory: "bytes",
  kv_cache_dtype: "string",
  dtype: "string",
  gpu_memory_utilization: "float",
  enforce_eager: "bool",
  async_scheduling: "bool",
  load_format: "string",
  tensor_parallel_size: "int",
  enable_prefix_caching: "bool",
  threads: "int",
  api_key: "list",
  protect_metrics: "bool",
  rate_limit: "string",
  rate_limit_tokens: "int",
  max_body_bytes: "bytes",
  max_header_bytes: "bytes",
  max_seqs_per_request: "int",
  allowed_origins: "list",
  drain_timeout: "float",
  metrics_prefix: "string",
  ssl_certfile: "string",
  ssl_keyfile: "string",
} as const;
export type Key = keyof typeof FLAGS;
export type Values = Partial<Record<Key, string | number | boolean | string[]>>;

/** The engine options, as both commands' usage texts list them. */
export const ENGINE_USAGE = `engine options (serve and generate; in a config file as snake_case keys):
  --device auto|cpu|cuda  (auto: a GPU where the CUDA build finds one, else the CPU; says which)
  --threads N           compute threads (default: all cores)
  --gpu-memory-utilization 0.9  share of the GPU's memory for weights, workspace and the KV pool
  --enforce-eager       no CUDA graphs (GPU)
  --no-async-scheduling  schedule each step after the last ends (default: while it runs)
  --load-format auto|dummy  dummy: random weights of the model's shape (a preset such as
                        llama-3-8b, a model folder, or a config.json), made on the GPU: benchmarks
  --max-model-len N     context length (default: the model's)
  --max-num-batched-tokens N  --max-num-seqs N  --max-queue-len N
  --block-size N  --num-gpu-blocks-override N  --kv-cache-memory 2GiB
  --kv-cache-dtype auto|f32|f16  (auto: the weights' own, as vLLM: f32 for f32 models, else f16)
  --dtype auto|float32|bfloat16  (auto = f32 products, exact; bfloat16: float weights
                        repacked to bf16 at load, bf16 products, faster prefill and batches)
  --enable-prefix-caching / --no-enable-prefix-caching (default on)
`;

/** The options that size and configure the engine (generate takes these and no others). */
export const ENGINE_KEYS = [
  "model",
  "device",
  "threads",
  "max_model_len",
  "max_num_batched_tokens",
  "max_num_seqs",
  "max_queue_len",
  "block_size",
  "num_gpu_blocks_override",
  "kv_cache_memory",
  "kv_cache_dtype",
  "dtype",
  "enable_prefix_caching",
  "gpu_memory_utilization",
  "enforce_eager",
  "async_scheduling",
  "load_format",
] as const satisfies readonly Key[];

type ArgOption = { type: "string" | "boolean"; multiple?: boolean };

/** node:util parseArgs options for these keys (booleans also as --no-FLAG). */
export function argOptions(keys: readonly Key[]): Record<string, ArgOption> {
  const options: Record<string, ArgOption> = {};
  for (const key of keys) {
    const kind = FLAGS[key];
    const flag = key.replaceAll("_", "-");
    options[flag] =
      kind === "bool" ? { type: "boolean" } : kind === "list" ? { type: "string", multiple: true } : { type: "string" };
    if (kind === "bool") options[`no-${flag}`] = { type: "boolean" };
  }
  return options;
}

/** Values of these keys from parseArgs' output, each read by its kind. */
export function valuesFromArgs(parsed: Record<string, unknown>, keys: readonly Key[]): Values {
  const values: Values = {};
  for (const key of keys) {
    const flag = key.replaceAll("_", "-");
    if (parsed[flag] !== undefined) values[key] = coerce(key, parsed[flag], "flag");
    if (parsed[`no-${flag}`]) values[key] = false;
  }
  return values;
}

function parseBytes(v: string | number, key: string): number {
  if (typeof v === "number") return v;
  const m = /^(\d+(?:\.\d+)?)\s*(b|kb|kib|mb|mib|gb|gib)?$/i.exec(v.trim());
  if (!m) throw new ConfigError(`${key}: '${v}' is not a size (e.g. 512MiB, 2GiB)`);
  const unit = (m[2] ?? "b").toLowerCase();
  const scale: Record<string, number> = { b: 1, kb: 1e3, kib: 1024, mb: 1e6, mib: 1024 ** 2, gb: 1e9, gib: 1024 ** 3 };
  return Math.floor(Number(m[1]) * scale[unit]);
}

export function coerce(key: Key, v: unknown, from: "flag" | "config"): string | number | boolean | string[] {
  const name = from === "flag" ? `--${key.replaceAll("_", "-")}` : key;
  const kind = FLAGS[key];
  const num = (x: unknown) => (typeof x === "number" ? x : typeof x === "string" && x.trim() !== "" ? Number(x) : NaN);
  switch (kind) {
    case "string":
      if (typeof v !== "string" || v === "") throw new ConfigError(`${name} must be a non-empty string`);
      return v;
    case "int": {
      const n = num(v);
      if (!Number.isInteger(n) || n < 0)
        throw new ConfigError(`${name} must be a non-negative integer, got ${JSON.stringify(v)}`);
      if (key === "port" && n > 65535) throw new ConfigError(`${name} must be a port number (0-65535), got ${n}`);
      return n;
    }
    case "float": {
      const n = num(v);
      if (!Number.isFinite(n) || n < 0)
        throw new ConfigError(`${name} must be a non-negative number, got ${JSON.stringify(v)}`);
      return n;
    }
    case "bytes":
      if (typeof v !== "string" && typeof v !== "number") throw new ConfigError(`${name} must be a size`);
      return parseBytes(v, name);
    case "bool":
      if (typeof v !== "boolean") throw new ConfigError(`${name} must be true or false, got ${JSON.stringify(v)}`);
      return v;
    case "list": {
      const list = Array.isArray(v) ? v : [v];
      if (!list.every((x) => typeof x === "string" && x !== ""))
        throw new ConfigError(`${name} must be a string or a list of strings`);
      return list as string[];
    }
  }
}

export function readConfigFile(path: string): Values {
  let doc: unknown;
  try {
    doc = YAML.parse(readFileSync(path, "utf8"));
  } catch (e) {
    throw new ConfigError(`${path}: ${(e as Error).message.split("\n")[0]}`);
  }
  if (doc === null || doc === undefined) return {};
  if (typeof doc !== "object" || Array.isArray(doc))
    throw new ConfigError(`${path}: expected a mapping of option: value`);
  const out: Values = {};
  for (const [k, v] of Object.entries(doc)) {
    if (!(k in FLAGS)) throw new ConfigError(`${path}: unknown key '${k}' (see \`inferneo serve --help\`)`);
    out[k as Key] = coerce(k as Key, v, "config");
  }
  // A model path written in the file means the file's folder, as a path in any config
  // file does; a hub id (org/name) or a path that is not there is left as written.
  if (typeof out.model === "string" && !isAbsolute(out.model)) {
    const beside = resolve(dirname(path), out.model);
    if (existsSync(beside)) out.model = beside;
  }
  return out;
}

/** Engine options from option values: dtypes by name, and the minimums each needs. */
export function engineOptionsOf(v: Values): Partial<EngineOptions> {
  if (v.device !== undefined && !["auto", "cpu", "cuda"].includes(String(v.device))) {
    throw new ConfigError(`device must be auto, cpu or cuda, got '${String(v.device)}'`);
  }
  const engine: Partial<EngineOptions> = {};
  if (v.device !== undefined) engine.device = v.device as EngineOptions["device"];
  if (v.gpu_memory_utilization !== undefined) {
    const g = v.gpu_memory_utilization as number;
    if (!(g > 0 && g <= 1)) throw new ConfigError(`gpu_memory_utilization must be in (0, 1], got ${g}`);
    engine.gpuMemoryUtilization = g;
  }
  const set = <K extends keyof EngineOptions>(k: K, x: unknown) => {
    if (x !== undefined) engine[k] = x as EngineOptions[K];
  };
  set("maxModelLen", v.max_model_len);
  set("maxNumBatchedTokens", v.max_num_batched_tokens);
  set("maxNumSeqs", v.max_num_seqs);
  set("maxQueueLen", v.max_queue_len);
  set("blockSizeTokens", v.block_size);
  set("numBlocksOverride", v.num_gpu_blocks_override);
  set("kvCacheMemoryBytes", v.kv_cache_memory);
  if (v.kv_cache_dtype !== undefined) {
    const d = v.kv_cache_dtype;
    if (d !== "auto" && d !== "f32" && d !== "f16")
      throw new ConfigError(`kv_cache_dtype must be auto, f32 or f16, got '${String(v.kv_cache_dtype)}'`);
    engine.kvCacheDtype = d;
  }
  if (v.dtype !== undefined) {
    const d = computeDtypeOf(String(v.dtype));
    if (!d) throw new ConfigError(`dtype must be auto, float32 or bfloat16, got '${String(v.dtype)}'`);
    engine.computeDtype = d;
  }
  set("enablePrefixCaching", v.enable_prefix_caching);
  set("enforceEager", v.enforce_eager);
  set("asyncScheduling", v.async_scheduling);
  if (v.load_format !== undefined) {
    if (v.load_format !== "auto" && v.load_format !== "dummy")
      throw new ConfigError(`load_format must be auto or dummy, got '${String(v.load_format)}'`);
    engine.loadFormat = v.load_format;
  }
  set("threads", v.threads);
  for (const [k, min] of [
    ["maxNumSeqs", 1],
    ["maxNumBatchedTokens", 1],
    ["blockSizeTokens", 1],
    ["threads", 1],
    ["maxModelLen", 1],
    ["numBlocksOverride", 1],
  ] as const) {
    const x = engine[k];
    if (x !== undefined && (x as number) < min)
      throw new ConfigError(`${k.replace(/[A-Z]/g, (c) => `_${c.toLowerCase()}`)} must be at least ${min}`);
  }
  return engine;
}
