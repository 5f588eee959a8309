// LoadBalancedClient: the guide's round-robin client over several replicas, made safe
// for replicas that die or drain. A replica that fails (connection refused or reset, 503)
// is skipped, with a backoff that doubles, until its /health answers 200 again; a request
// that failed before any token reached the caller is retried on another replica, so the
// caller sees one answer; a stream cut after its first token throws (never a quiet end).
// 429s move to another replica, and wait for Retry-After only when every replica is busy.
import {
  InferneoApiError,
  InferneoClient,
  type ChatCompletionChunk,
  type ClientOptions,
  type CompletionChunk,
} from "./index.ts";
import type {
  ChatCompletionRequest,
  ChatCompletionResponse,
  CompletionRequest,
  CompletionResponse,
} from "../server/schemas.ts";

export interface LoadBalancedOptions extends Omit<ClientOptions, "maxRetries"> {
  /** round-robin (the guide's), or least-loaded: fewest running + waiting by each replica's /metrics. */
  strategy?: "round-robin" | "least-loaded";
  /** Attempts a request may take over all replicas (default: 2 per replica). */
  maxAttempts?: number;
  backoffMs?: number; // first wait before a failed replica is tried again (doubles, to backoffMaxMs)
  backoffMaxMs?: number;
}

interface Replica {
  url: string;
  client: InferneoClient;
  downUntil: number; // ms epoch; 0 = healthy
  failures: number;
  load: { at: number; value: number } | null; // running + waiting, from /metrics
}

/** Worth another replica: the server never took the request, went away, or is draining or busy. */
function retryable(e: unknown): boolean {
  if (!(e instanceof InferneoApiError)) return true; // network errors: refused, reset, timed out
  return e.status === 0 || e.status === 429 || e.status >= 500;
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const LOAD_TTL_MS = 250;

/** Whether a chunk carries generated text or a finish: once one reaches the caller, no retry. */
function carriesToken(chunk: CompletionChunk | ChatCompletionChunk): boolean {
  return chunk.choices.some(
    (c) =>
      ("text" in c && c.text !== "") || ("delta" in c && (c.delta.content ?? "") !== "") || c.finish_reason !== null,
  );
}

export class LoadBalancedClient {
  readonly completions: InferneoClient["completions"];
  readonly chat: InferneoClient["chat"];
  private readonly replicas: Replica[];
  private next = 0;

  constructor(
    servers: string[],
    private readonly options: LoadBalancedOptions = {},
  ) {
    if (servers.length === 0) throw new Error("LoadBalancedClient needs at least one server");
    this.replicas = servers.map((url) => ({
      url: url.replace(/\/+$/, "").replace(/\/v1$/, ""),
      client: new InferneoClient(url, { ...options, maxRetries: 0 }),
      downUntil: 0,
      failures: 0,
      load: null,
    }));
    const post = (kind: "completions" | "chat") => (params: CompletionRequest | ChatCompletionRequest) =>
      params.stream ? this.stream(kind, params) : this.once(kind, params);
    this.completions = { create: post("completions") as InferneoClient["completions"]["create"] };
    this.chat = { completions: { create: post("chat") as InferneoClient["chat"]["completions"]["create"] } };
  }

  /** Replica URLs and whether each is in use now (for monitors). */
  status(): { url: string; healthy: boolean; failures: number }[] {
    const now = Date.now();
    return this.replicas.map((r) => ({ url: r.url, healthy: r.downUntil <= now, failures: r.failures }));
  }

  private call(r: Replica, kind: "completions" | "chat", params: CompletionRequest | ChatCompletionRequest) {
    return kind === "chat"
      ? r.client.chat.completions.create(params as ChatCompletionRequest & { stream?: false })
      : r.client.completions.create(params as CompletionRequest & { stream?: false });
  }

  private markDown(r: Replica): void {
    r.failures += 1;
    const base = this.options.backoffMs ?? 500;
    r.downUntil = Date.now() + Math.min(this.options.backoffMaxMs ?? 30_000, base * 2 ** (r.failures - 1));
  }

  private markUp(r: Replica): void {
    r.failures = 0;
    r.downUntil = 0;
  }

  /** A replica whose backoff has passed is used again only once its /health answers 200. */
  private async usable(r: Replica): Promise<boolean> {
    if (r.failures === 0) return true;
    if (r.downUntil > Date.now()) return false;
    try {
      const res = await fetch(`${r.url}/health`, { signal: AbortSignal.timeout(1000) });
      await res.body?.cancel();
      if (res.ok) return true;
    } catch {
      // still down
    }
    this.markDown(r);
    return false;
  }

  private async loadOf(r: Replica): Promise<number> {
    if (r.load && Date.now() - r.load.at < LOAD_TTL_MS) return r.load.value;
    try {
      const m = (await (await fetch(`${r.url}/metrics`, { signal: AbortSignal.timeout(1000) })).json()) as {
        active_requests?: number;
        queue_size?: number;
      };
      r.load = { at: Date.now(), value: (m.active_requests ?? 0) + (m.queue_size ?? 0) };
    } catch {
      r.load = { at: Date.now(), value: Number.POSITIVE_INFINITY };
    }
    return r.load.value;
  }

  /** The next replica to try, skipping `tried` and unusable ones; null when none is left. */
  private async pick(tried: Set<Replica>): Promise<Replica | null> {
    const candidates: Replica[] = [];
    for (let i = 0; i < this.replicas.length; i++) {
      const r = this.replicas[(this.next + i) % this.replicas.length];
      if (!tried.has(r) && (await this.usable(r))) candidates.push(r);
    }
    this.next = (this.next + 1) % this.replicas.length;
    if (candidates.length === 0) return null;
    if (this.options.strategy !== "least-loaded") return candidates[0];
    const loads = await Promise.all(candidates.map((r) => this.loadOf(r)));
    return candidates[loads.indexOf(Math.min(...loads))];
  }

  /**
   * Runs `attempt` on replicas in turn until one succeeds or the attempts run out. A round
   * that found every replica tried or down starts again after a pause (Retry-After if given).
   */
  private async withFailover<T>(attempt: (r: Replica) => Promise<T>): Promise<T> {
    const maxAttempts = this.options.maxAttempts ?? 2 * this.replicas.length;
    let tried = new Set<Replica>();
    let last: unknown = new Error("no replica is available");
    let waitMs = 250;
    for (let n = 0; n < maxAttempts;) {
      const r = await this.pick(tried);
      if (r === null) {
        tried = new Set();
        await sleep(waitMs);
        waitMs = Math.min(waitMs * 2, 5000);
        continue;
      }
      tried.add(r);
      n += 1;
      try {
        const out = await attempt(r);
        this.markUp(r);
        return out;
      } catch (e) {
        last = e;
        if (!retryable(e)) throw e;
        if (e instanceof InferneoApiError && e.status === 429) {
          const after = Number(e.retryAfter ?? 0);
          if (after > 0) waitMs = Math.max(waitMs, after * 1000);
        } else this.markDown(r);
      }
    }
    throw last;
  }

  private once(
    kind: "completions" | "chat",
    params: CompletionRequest | ChatCompletionRequest,
  ): Promise<CompletionResponse | ChatCompletionResponse> {
    return this.withFailover(
      (r) => this.call(r, kind, { ...params, stream: false }) as Promise<CompletionResponse | ChatCompletionResponse>,
    );
  }

  /**
   * A stream whose chunks are held until the first that carries a token: until then a
   * failure moves the whole request to another replica, and the caller sees one stream.
   */
  private async stream(
    kind: "completions" | "chat",
    params: CompletionRequest | ChatCompletionRequest,
  ): Promise<AsyncIterable<CompletionChunk | ChatCompletionChunk>> {
    type Chunk = CompletionChunk | ChatCompletionChunk;
    const opened = await this.withFailover(async (r) => {
      const it = (await this.call(r, kind, params)) as unknown as AsyncIterable<Chunk>;
      const iterator = it[Symbol.asyncIterator]();
      const held: Chunk[] = [];
      for (;;) {
        const next = await iterator.next(); // a failure here is retried elsewhere
        if (next.done) return { held, iterator, finished: true };
        held.push(next.value);
        if (carriesToken(next.value)) return { held, iterator, finished: false };
      }
    });
    return (async function* () {
      yield* opened.held;
      if (opened.finished) return;
      for (;;) {
        const next = await opened.iterator.next();
        if (next.done) return;
        yield next.value;
      }
    })();
  }
}
