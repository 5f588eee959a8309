// InferneoClient: a small TypeScript client for the server's OpenAI-compatible API,
// with streaming as async iterators and retries with exponential backoff on 429/5xx.
import type {
  ChatCompletionRequest,
  ChatCompletionResponse,
  CompletionRequest,
  CompletionResponse,
} from "../server/schemas.ts";

export interface ClientOptions {
  apiKey?: string;
  timeoutMs?: number; // per attempt (default 10 minutes)
  maxRetries?: number; // for 429 and 5xx (default 3)
  fetch?: typeof fetch;
}

export class InferneoApiError extends Error {
  constructor(
    readonly status: number,
    readonly body: { error?: { message?: string; type?: string; param?: string | null; code?: string | null } } | null,
    /** Seconds the server asked to wait (Retry-After), when it did. */
    readonly retryAfter: number | null = null,
  ) {
    super(body?.error?.message ?? `HTTP ${status}`);
    this.name = "InferneoApiError";
  }
}

export type CompletionChunk = Omit<CompletionResponse, "usage" | "choices"> & {
  choices: {
    index: number;
    text: string;
    finish_reason: string | null;
    logprobs: CompletionResponse["choices"][number]["logprobs"];
  }[];
  usage?: CompletionResponse["usage"];
};
export type ChatCompletionChunk = {
  id: string;
  object: "chat.completion.chunk";
  created: number;
  model: string;
  choices: {
    index: number;
    delta: {
      role?: "assistant";
      content?: string;
      tool_calls?: { index: number; id: string; type: "function"; function: { name: string; arguments: string } }[];
    };
    finish_reason: string | null;
    logprobs: unknown;
  }[];
  usage?: ChatCompletionResponse["usage"];
};
export interface ModelInfo {
  id: string;
  object: "model";
  created: number;
  owned_by: string;
  max_model_len: number;
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

export { LoadBalancedClient, type LoadBalancedOptions } from "./load_balanced.ts";

export class InferneoClient {
  readonly completions: {
    create(params: CompletionRequest & { stream: true }): Promise<AsyncIterable<CompletionChunk>>;
    create(params: CompletionRequest & { stream?: false | null }): Promise<CompletionResponse>;
  };
  readonly chat: {
    completions: {
      create(params: ChatCompletionRequest & { stream: true }): Promise<AsyncIterable<ChatCompletionChunk>>;
      create(params: ChatCompletionRequest & { stream?: false | null }): Promise<ChatCompletionResponse>;
    };
  };
  readonly models: { list(): Promise<{ object: "list"; data: ModelInfo[] }> };
  private readonly base: string;

  constructor(
    baseUrl: string,
    private readonly options: ClientOptions = {},
  ) {
    this.base = baseUrl.replace(/\/+$/, "").replace(/\/v1$/, "");
    const post = <T>(path: string, body: { stream?: boolean | null }) =>
      body.stream ? this.stream<T>(path, body) : this.json<T>(path, body);
    this.completions = {
      create: ((p: CompletionRequest) => post("/v1/completions", p)) as InferneoClient["completions"]["create"],
    };
    this.chat = {
      completions: {
        create: ((p: ChatCompletionRequest) =>
          post("/v1/chat/completions", p)) as InferneoClient["chat"]["completions"]["create"],
      },
    };
    this.models = {
      list: () =>
        this.request("GET", "/v1/models").then((r) => r.json() as Promise<{ object: "list"; data: ModelInfo[] }>),
    };
  }

  private async request(method: string, path: string, body?: unknown): Promise<Response> {
    const f = this.options.fetch ?? fetch;
    const retries = this.options.maxRetries ?? 3;
    for (let attempt = 0; ; attempt++) {
      const headers: Record<string, string> = { "content-type": "application/json" };
      if (this.options.apiKey) headers.authorization = `Bearer ${this.options.apiKey}`;
      let res: Response;
      try {
        res = await f(this.base + path, {
          method,
          headers,
          body: body === undefined ? undefined : JSON.stringify(body),
          signal: AbortSignal.timeout(this.options.timeoutMs ?? 600_000),
        });
      } catch (e) {
        if (attempt >= retries) throw e;
        await sleep(500 * 2 ** attempt);
        continue;
      }
      if (res.ok) return res;
      const retryable = res.status === 429 || res.status >= 500;
      if (!retryable || attempt >= retries) {
        const payload = (await res.json().catch(() => null)) as InferneoApiError["body"];
        const after = Number(res.headers.get("retry-after"));
        throw new InferneoApiError(res.status, payload, Number.isFinite(after) && after > 0 ? after : null);
      }
      await res.body?.cancel();
      const after = Number(res.headers.get("retry-after"));
      await sleep(Number.isFinite(after) && after > 0 ? after * 1000 : 500 * 2 ** attempt);
    }
  }

  private async json<T>(path: string, body: unknown): Promise<T> {
    return (await this.request("POST", path, body)).json() as Promise<T>;
  }

  private async stream<T>(path: string, body: unknown): Promise<AsyncIterable<T>> {
    const res = await this.request("POST", path, body);
    if (!res.body) throw new InferneoApiError(res.status, null);
    return parseSse<T>(res.body);
  }
}

/** Server-Sent Events to JSON payloads; stops at [DONE], throws on an error frame or a cut stream. */
export async function* parseSse<T>(body: ReadableStream<Uint8Array>): AsyncGenerator<Awaited<T>> {
  const decoder = new TextDecoder();
  let buffer = "";
  const reader = body.getReader();
  try {
    for (;;) {
      const { value, done } = await reader.read();
      // A server that dies mid-stream closes it without [DONE]: that is an error, never a quiet end.
      if (done)
        throw new InferneoApiError(0, {
          error: { message: "the stream ended before [DONE] (the server went away)", type: "stream_cut" },
        });
      buffer += decoder.decode(value, { stream: true });
      let end: number;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const frame = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const data = frame
          .split("\n")
          .filter((l) => l.startsWith("data:"))
          .map((l) => l.slice(5).trimStart())
          .join("\n");
        if (data === "") continue; // a comment (heartbeat)
        if (data === "[DONE]") return;
        const parsed = JSON.parse(data) as T & { error?: { message?: string } };
        if (parsed.error) throw new InferneoApiError(200, parsed as InferneoApiError["body"]);
        yield parsed as Awaited<T>;
      }
    }
  } finally {
    await reader.cancel().catch(() => {});
  }
}
