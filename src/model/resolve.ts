// Where a --model argument points: a local HF folder, a local .gguf file, or a
// hub id (org/name) found in, or downloaded into, the standard Hugging Face cache.
import { createWriteStream, existsSync, mkdirSync, readFileSync, renameSync, statSync, writeFileSync } from "node:fs";
import { homedir } from "node:os";
import { dirname, join } from "node:path";
import { ModelLoadError } from "./errors.ts";

/** The model served when none is given: llama2.c's stories260K (MIT), shipped with the repository. */
export const EMBEDDED_MODEL = join(import.meta.dir, "..", "..", "assets", "stories260K", "stories260K.gguf");
export const EMBEDDED_MODEL_NAME = "stories260K";

/** Where a model's files are. */
export type FileSource = { kind: "hf"; dir: string } | { kind: "gguf"; path: string };
/** What a model was loaded from: its files, or (--load-format dummy) a shape with random weights. */
export type ModelSource = FileSource | { kind: "dummy"; name: string };

const HUB_ID = /^[A-Za-z0-9][\w.-]*\/[\w.-]+$/;
// What a Llama model needs from a hub repository; everything else (other formats, images) is skipped.
const WANTED_FILE =
  /^(config\.json|generation_config\.json|tokenizer\.json|tokenizer_config\.json|special_tokens_map\.json|chat_template\.jinja|model\.safetensors\.index\.json|[^/]*\.safetensors)$/;

export function hubCacheDir(env: NodeJS.ProcessEnv = process.env): string {
  if (env.HF_HUB_CACHE) return env.HF_HUB_CACHE;
  const home = env.HF_HOME ?? join(env.XDG_CACHE_HOME ?? join(homedir(), ".cache"), "huggingface");
  return join(home, "hub");
}

/** The cached snapshot folder of a hub id, or null when it is not cached. */
export function cachedSnapshot(id: string, revision = "main", env: NodeJS.ProcessEnv = process.env): string | null {
  const repoDir = join(hubCacheDir(env), `models--${id.replace("/", "--")}`);
  const refPath = join(repoDir, "refs", revision);
  const commit = existsSync(refPath) ? readFileSync(refPath, "utf8").trim() : revision;
  const snapshot = join(repoDir, "snapshots", commit);
  return existsSync(join(snapshot, "config.json")) ? snapshot : null;
}

export async function resolveModel(arg: string, env: NodeJS.ProcessEnv = process.env): Promise<FileSource> {
  if (existsSync(arg)) {
    const st = statSync(arg);
    if (st.isDirectory()) return { kind: "hf", dir: arg };
    if (arg.endsWith(".gguf")) return { kind: "gguf", path: arg };
    throw new ModelLoadError(`${arg}: expected a Hugging Face model folder or a .gguf file`);
  }
  if (!HUB_ID.test(arg)) throw new ModelLoadError(`model path ${arg} does not exist`);
  const cached = cachedSnapshot(arg, "main", env);
  if (cached) return { kind: "hf", dir: cached };
  const offline = env.HF_HUB_OFFLINE === "1" || env.HF_HUB_OFFLINE === "true";
  const hint = `pass a local path instead: --model /path/to/model-folder or --model /path/to/model.gguf`;
  if (offline)
    throw new ModelLoadError(
      `model ${arg} is not in the Hugging Face cache (${hubCacheDir(env)}) and HF_HUB_OFFLINE is set: ${hint}`,
    );
  try {
    return { kind: "hf", dir: await downloadSnapshot(arg, env) };
  } catch (e) {
    if (e instanceof ModelLoadError) throw e;
    throw new ModelLoadError(
      `model ${arg} is not in the Hugging Face cache (${hubCacheDir(env)}) and the hub could not be reached (${(e as Error).message}): ${hint}`,
    );
  }
}

async function downloadSnapshot(id: string, env: NodeJS.ProcessEnv): Promise<string> {
  const endpoint = (env.HF_ENDPOINT ?? "https://huggingface.co").replace(/\/$/, "");
  const headers: Record<string, string> = env.HF_TOKEN ? { authorization: `Bearer ${env.HF_TOKEN}` } : {};
  const info = await fetch(`${endpoint}/api/models/${id}/revision/main`, {
    headers,
    signal: AbortSignal.timeout(15_000),
  });
  if (info.status === 401 || info.status === 403)
    throw new ModelLoadError(`model ${id} needs access rights on the hub: set HF_TOKEN`);
  if (info.status === 404) throw new ModelLoadError(`model ${id} does not exist on ${endpoint}`);
  if (!info.ok) throw new Error(`hub answered ${info.status}`);
  const meta = (await info.json()) as { sha: string; siblings: { rfilename: string }[] };
  const files = meta.siblings.map((s) => s.rfilename).filter((f) => WANTED_FILE.test(f));
  if (!files.includes("config.json"))
    throw new ModelLoadError(`model ${id} has no config.json on the hub: not a Transformers model`);
  const repoDir = join(hubCacheDir(env), `models--${id.replace("/", "--")}`);
  const snapshot = join(repoDir, "snapshots", meta.sha);
  for (const file of files) {
    const target = join(snapshot, file);
    if (existsSync(target)) continue;
    mkdirSync(dirname(target), { recursive: true });
    const res = await fetch(`${endpoint}/${id}/resolve/${meta.sha}/${file}`, { headers });
    if (!res.ok || !res.body) throw new Error(`downloading ${file}: hub answered ${res.status}`);
    const total = Number(res.headers.get("content-length") ?? 0);
    const partial = `${target}.incomplete`;
    const out = createWriteStream(partial);
    let done = 0;
    for await (const chunk of res.body) {
      out.write(chunk);
      done += chunk.byteLength;
      progress(file, done, total);
    }
    await new Promise<void>((resolve, reject) => out.end((err?: Error | null) => (err ? reject(err) : resolve())));
    renameSync(partial, target);
    process.stderr.write("\n");
  }
  mkdirSync(join(repoDir, "refs"), { recursive: true });
  writeFileSync(join(repoDir, "refs", "main"), meta.sha);
  return snapshot;
}

function progress(file: string, done: number, total: number): void {
  const mb = (n: number) => (n / 1e6).toFixed(1);
  const width = 30;
  const frac = total > 0 ? Math.min(1, done / total) : 0;
  const bar = "#".repeat(Math.round(frac * width)).padEnd(width, ".");
  process.stderr.write(`\r${file} [${bar}] ${mb(done)}/${total > 0 ? mb(total) : "?"} MB`);
}
