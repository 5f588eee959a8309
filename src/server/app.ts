// The HTTP and WebSocket server: one Elysia instance, routes grouped by feature,
// every error in OpenAI's shape. Built around a ServerState so that it can answer
// /health with 503 while the model loads and while it drains.
import { openapi } from "@elysiajs/openapi";
import { Value } from "@sinclair/typebox/value";
import { Elysia, type TSchema, type ValidationError } from "elysia";
import type { Server } from "bun";
import { readFileSync } from "node:fs";
import { createRequire } from "node:module";
import { dirname, join } from "node:path";
import type { LLMEngine } from "../engine/llm_engine.ts";
import { ApiKeys, RateLimiter, type RateLimitConfig } from "./auth.ts";
import { ApiError, toApiError, unavailable } from "./errors.ts";
import { OpenAIService, type Running } from "./openai.ts";
import {
  BatchCompletionRequest,
  BatchCompletionResponse,
  ChatCompletionRequest,
  ChatCompletionResponse,
  CompletionRequest,
  CompletionResponse,
  DetokenizeRequest,
  DetokenizeResponse,
  ErrorResponse,
  Health,
  ModelList,
  TokenizeRequest,
  TokenizeResponse,
  Version,
} from "./schemas.ts";

export const VERSION = (JSON.parse(readFileSync(join(import.meta.dir, "..", "..", "package.json"), "utf8")) as { version: string }).version;

export interface ServerOptions {
  servedModelName: string;
  apiKeys: string[];
  protectMetrics: boolean;
  rateLimit: RateLimitConfig | null;
  maxBodyBytes: number;
  heartbeatMs: number;
}

export const DEFAULT_SERVER_OPTIONS: ServerOptions = {
  servedModelName: "model",
  apiKeys: [],
  protectMetrics: false,
  rateLimit: null,
  maxBodyBytes: 8 * 1024 * 1024,
  heartbeatMs: 15_000,
};

export class ServerState {
  status: "loading" | "ready" | "draining" = "loading";
  engine: LLMEngine | null = null;
  service: OpenAIService | null = null;
  startedMs = Date.now();

  ready(engine: LLMEngine, servedModelName: string): void {
    this.engine = engine;
    this.service = new OpenAIService(engine, servedModelName);
    this.status = "ready";
  }

  /** The service, or 503 while loading or draining. */
  serving(): OpenAIService {
    if (this.status !== "ready" || this.service === null) throw unavailable(this.status === "draining" ? "draining" : "loading");
    return this.service;
  }
}

const swaggerDir = dirname(createRequire(import.meta.url).resolve("swagger-ui-dist/package.json"));
const SWAGGER_ASSETS: Record<string, string> = {
  "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
  "swagger-ui.css": "text/css; charset=utf-8",
};

/** A schema in words: "an integer >= 1 or null". */
function describe(schema: TSchema): string {
  const range = (x: TSchema) =>
    [
      x.minimum !== undefined ? `>= ${x.minimum}` : null,
      x.exclusiveMinimum !== undefined ? `> ${x.exclusiveMinimum}` : null,
      x.maximum !== undefined ? `<= ${x.maximum}` : null,
    ]
      .filter(Boolean)
      .join(" and ");
  if (Array.isArray(schema.anyOf)) {
    // A description that names the value ("A string, a list of ...") says it best; others
    // are notes for the docs ("Default 16."), not what the value must be.
    if (typeof schema.description === "string" && /^An? /.test(schema.description)) return schema.description.replace(/^A/, "a").replace(/\.$/, "");
    return (schema.anyOf as TSchema[]).map(describe).join(" or ");
  }
  if (schema.const !== undefined) return JSON.stringify(schema.const);
  switch (schema.type) {
    case "integer":
    case "number": {
      const r = range(schema);
      return `${schema.type === "integer" ? "an integer" : "a number"}${r ? ` ${r}` : ""}`;
    }
    case "string":
      return schema.minLength ? "a non-empty string" : "a string";
    case "array":
      return schema.minItems ? `a non-empty array${schema.maxItems ? ` of at most ${schema.maxItems} items` : ""}` : "an array";
    case "null":
      return "null";
    default:
      return schema.type ? `a${/^[aeiou]/.test(String(schema.type)) ? "n" : ""} ${schema.type}` : "a valid value";
  }
}

function validationMessage(error: Readonly<ValidationError>): { message: string; param: string | null } {
  const all = error.all as { path?: string; message: string; schema?: TSchema; value?: unknown }[];
  const first = all.find((e) => e.path !== undefined);
  if (!first) return { message: "The request body is not valid.", param: null };
  const param = first.path!.replace(/^\//, "").replaceAll("/", ".") || null;
  if (/unexpected property/i.test(first.message)) return { message: `Unrecognized request argument supplied: ${param}`, param };
  if (first.value === undefined) return { message: `Missing required parameter: '${param}'.`, param };
  const expected = first.schema ? describe(first.schema) : first.message;
  return { message: `Invalid value for '${param ?? "body"}': ${JSON.stringify(first.value)?.slice(0, 80)} is not ${expected}.`, param };
}

const SSE_HEADERS = { "content-type": "text/event-stream; charset=utf-8", "cache-control": "no-cache", connection: "keep-alive", "x-accel-buffering": "no" };

/** Streams chunks as Server-Sent Events; a client that goes away cancels the requests. */
function sse(chunks: AsyncGenerator<Record<string, unknown>>, running: Running, heartbeatMs: number): Response {
  const encoder = new TextEncoder();
  let heartbeat: ReturnType<typeof setInterval> | undefined;
  const stream = new ReadableStream<Uint8Array>({
    start(controller) {
      // Comments keep proxies and idle timeouts from closing a stream that is thinking.
      heartbeat = setInterval(() => controller.enqueue(encoder.encode(": ping\n\n")), heartbeatMs);
    },
    async pull(controller) {
      try {
        const next = await chunks.next();
        if (next.done) {
          controller.enqueue(encoder.encode("data: [DONE]\n\n"));
          clearInterval(heartbeat);
          controller.close();
          return;
        }
        controller.enqueue(encoder.encode(`data: ${JSON.stringify(next.value)}\n\n`));
      } catch (e) {
        // Once the stream has begun the status is sent; the error travels as a frame.
        controller.enqueue(encoder.encode(`data: ${JSON.stringify(toApiError(e).body)}\n\n`));
        controller.enqueue(encoder.encode("data: [DONE]\n\n"));
        clearInterval(heartbeat);
        running.cancel();
        controller.close();
      }
    },
    cancel() {
      clearInterval(heartbeat);
      running.cancel();
      void chunks.return(undefined);
    },
  });
  return new Response(stream, { headers: SSE_HEADERS });
}

/**
 * A non-streamed request may compute for longer than the server's idle timeout with
 * nothing to send: lift the timeout for it, and abort its work if the client leaves.
 */
function longRequest(server: Server<unknown> | null, request: Request, running: Running): void {
  server?.timeout(request, 0);
  request.signal.addEventListener("abort", running.cancel);
}

function wantsPrometheus(accept: string | null): boolean {
  return accept !== null && /text\/plain|openmetrics/.test(accept);
}

export function createApp(state: ServerState, options: ServerOptions) {
  const keys = new ApiKeys(options.apiKeys);
  const limiter = options.rateLimit ? new RateLimiter(options.rateLimit) : null;
  const callerOf = new WeakMap<Request, string>();

  const guarded = (path: string) =>
    path.startsWith("/v1/") || path === "/tokenize" || path === "/detokenize" || (options.protectMetrics && path === "/metrics");

  /** Charges a finished request's tokens to its caller's per-minute budget. */
  const charge = (request: Request, usage: { total_tokens: number } | undefined) => {
    if (limiter && usage) limiter.charge(callerOf.get(request) ?? "", usage.total_tokens);
  };

  const docs = new Elysia({ name: "docs" })
    .use(
      openapi({
        path: "/docs",
        specPath: "/openapi.json",
        provider: "swagger-ui",
        exclude: { methods: ["ws"], paths: ["/docs/assets/*"] },
        swagger: { cdn: "/docs/assets/swagger-ui-bundle.js", theme: "/docs/assets/swagger-ui.css", autoDarkMode: false },
        documentation: {
          info: { title: "Inferneo", version: VERSION, description: "OpenAI-compatible inference server. The same path also serves a WebSocket for chat streaming." },
          components: { securitySchemes: { bearer: { type: "http", scheme: "bearer" } } },
          security: options.apiKeys.length > 0 ? [{ bearer: [] }] : [],
        },
      }),
    )
    .get(
      "/docs/assets/:file",
      ({ params }) => {
        const type = SWAGGER_ASSETS[params.file];
        if (!type) throw new ApiError(404, `no asset ${params.file}`, "invalid_request_error", null, "not_found");
        return new Response(Bun.file(join(swaggerDir, params.file)), { headers: { "content-type": type, "cache-control": "public, max-age=86400" } });
      },
      { detail: { hide: true } },
    );

  const ops = new Elysia({ name: "ops" })
    .get(
      "/health",
      ({ set }) => {
        if (state.status !== "ready") set.status = 503;
        return { status: state.status === "ready" ? "ok" : state.status };
      },
      { response: { 200: Health, 503: Health }, detail: { summary: "Liveness and readiness: 503 while loading or draining" } },
    )
    .get("/version", () => ({ version: VERSION }), { response: Version })
    .get(
      "/metrics",
      async ({ request }) => {
        const engine = state.engine;
        if (wantsPrometheus(request.headers.get("accept"))) {
          const text = engine ? await engine.metrics.registry.metrics() : "";
          return new Response(text, { headers: { "content-type": "text/plain; version=0.0.4; charset=utf-8" } });
        }
        const scalar = async (name: string) => {
          const m = engine ? await engine.metrics.registry.getSingleMetric(name)?.get() : undefined;
          return m?.values.reduce((a, v) => a + v.value, 0) ?? 0;
        };
        return {
          status: state.status,
          model: options.servedModelName,
          active_requests: engine?.numRunning ?? 0,
          queue_size: engine?.numWaiting ?? 0,
          kv_cache_usage: engine?.kv.usage ?? 0,
          kv_cache_blocks_total: engine?.numBlocks ?? 0,
          kv_cache_blocks_free: engine?.kv.numFreeBlocks ?? 0,
          gpu_utilization: null,
          prompt_tokens_total: await scalar("inferneo:prompt_tokens_total"),
          generation_tokens_total: await scalar("inferneo:generation_tokens_total"),
          num_preemptions_total: await scalar("inferneo:num_preemptions_total"),
          prefix_cache_queries_total: await scalar("inferneo:prefix_cache_queries_total"),
          prefix_cache_hits_total: await scalar("inferneo:prefix_cache_hits_total"),
          uptime_seconds: Math.round((Date.now() - state.startedMs) / 1000),
        };
      },
      { detail: { summary: "Prometheus text (Accept: text/plain) or JSON (otherwise)" } },
    )
    .get(
      "/v1/models",
      () => ({
        object: "list" as const,
        data: state.engine
          ? [{ id: options.servedModelName, object: "model" as const, created: Math.floor(state.startedMs / 1000), owned_by: "inferneo", max_model_len: state.engine.maxModelLen }]
          : [],
      }),
      { response: { 200: ModelList, 401: ErrorResponse } },
    )
    .post(
      "/tokenize",
      ({ body }) => {
        const service = state.serving();
        service.checkModel(body.model);
        const tok = state.engine!.model.tokenizer;
        const tokens = "prompt" in body ? tok.encode(body.prompt, body.add_special_tokens ?? true) : service.chatPromptIds(body.messages, body.add_generation_prompt ?? true);
        return { tokens, count: tokens.length, max_model_len: state.engine!.maxModelLen };
      },
      { body: TokenizeRequest, response: { 200: TokenizeResponse, 400: ErrorResponse } },
    )
    .post(
      "/detokenize",
      ({ body }) => {
        const service = state.serving();
        service.checkModel(body.model);
        const vocab = state.engine!.model.spec.config.vocabSize;
        const bad = body.tokens.find((t) => t >= vocab);
        if (bad !== undefined) throw new ApiError(400, `token id ${bad} is outside the vocabulary (0..${vocab - 1})`, "invalid_request_error", "tokens");
        return { prompt: state.engine!.model.tokenizer.decode(body.tokens) };
      },
      { body: DetokenizeRequest, response: { 200: DetokenizeResponse, 400: ErrorResponse } },
    );

  const completions = new Elysia({ name: "openai" })
    .post(
      "/v1/completions",
      async ({ body, request, server }) => {
        const service = state.serving();
        const prepared = service.prepareCompletion(body);
        const running = service.start(prepared);
        if (body.stream) return sse(service.completionChunks(prepared, running), running, options.heartbeatMs);
        longRequest(server, request, running);
        const response = await service.completion(prepared, running);
        charge(request, response.usage);
        return Response.json(response);
      },
      { body: CompletionRequest, response: { 200: CompletionResponse, 400: ErrorResponse, 404: ErrorResponse, 429: ErrorResponse }, detail: { summary: "Text completion (stream: SSE)" } },
    )
    .post(
      "/v1/chat/completions",
      async ({ body, request, server }) => {
        const service = state.serving();
        const prepared = service.prepareChat(body);
        const running = service.start(prepared);
        if (body.stream) return sse(service.chatChunks(prepared, running), running, options.heartbeatMs);
        longRequest(server, request, running);
        const response = await service.chat(prepared, running);
        charge(request, response.usage);
        return Response.json(response);
      },
      {
        body: ChatCompletionRequest,
        response: { 200: ChatCompletionResponse, 400: ErrorResponse, 404: ErrorResponse, 429: ErrorResponse },
        detail: { summary: "Chat completion (stream: SSE). A WebSocket on the same path streams the same chunks." },
      },
    )
    .post(
      "/v1/completions/batch",
      async ({ body, request, server }) => {
        const service = state.serving();
        const prepared = service.prepareBatch(body);
        const running = service.start(prepared);
        longRequest(server, request, running);
        const all = await service.completion({ ...prepared, echo: false }, running);
        charge(request, all.usage);
        // One completion object per prompt, in order, each with its own n choices.
        const n = body.n ?? 1;
        return {
          object: "list" as const,
          data: body.prompts.map((_, p) => {
            const choices = all.choices.filter((c) => Math.floor(c.index / n) === p).map((c) => ({ ...c, index: c.index % n }));
            const completion = choices.reduce((a, c) => a + (c.logprobs?.tokens.length ?? 0), 0);
            const promptTokens = prepared.jobs.find((j) => Math.floor(j.choice / n) === p)!.promptIds.length;
            return {
              ...all,
              id: `${all.id}-${p}`,
              choices,
              usage: { prompt_tokens: promptTokens, completion_tokens: completion, total_tokens: promptTokens + completion, prompt_tokens_details: { cached_tokens: 0 } },
            };
          }),
        };
      },
      { body: BatchCompletionRequest, response: { 200: BatchCompletionResponse, 400: ErrorResponse }, detail: { summary: "Several prompts at once, one completion each, in order" } },
    );

  const websocket = new Elysia({ name: "ws" }).ws("/v1/chat/completions", {
    // Messages are parsed here, not by Elysia, so that bad JSON gets an error message, not a closed socket.
    parse: (_ws, message) => message,
    open(ws) {
      (ws.data as unknown as { running: Set<Running> }).running = new Set();
    },
    async message(ws, message) {
      const running = (ws.data as unknown as { running: Set<Running> }).running;
      const send = (v: unknown) => ws.send(typeof v === "string" ? v : JSON.stringify(v));
      let current: Running | null = null;
      try {
        let body: unknown = message;
        if (typeof message === "string") {
          try {
            body = JSON.parse(message);
          } catch {
            throw new ApiError(400, "The message is not valid JSON.", "invalid_request_error");
          }
        }
        if (!Value.Check(ChatCompletionRequest, body)) {
          const first = [...Value.Errors(ChatCompletionRequest, body)][0];
          const param = first?.path.replace(/^\//, "").replaceAll("/", ".") || null;
          throw new ApiError(400, first ? `Invalid value for '${param ?? "message"}': ${first.message}` : "Invalid chat request.", "invalid_request_error", param);
        }
        const service = state.serving();
        const prepared = service.prepareChat(body);
        current = service.start(prepared);
        running.add(current);
        for await (const chunk of service.chatChunks(prepared, current)) send(chunk);
        send("[DONE]");
      } catch (e) {
        send(toApiError(e).body);
      } finally {
        if (current) {
          current.cancel();
          running.delete(current);
        }
      }
    },
    close(ws) {
      for (const r of (ws.data as unknown as { running?: Set<Running> }).running ?? []) r.cancel();
    },
  });

  return new Elysia({ normalize: false })
    .onRequest(({ request, server }) => {
      const path = new URL(request.url).pathname;
      const length = Number(request.headers.get("content-length") ?? 0);
      if (length > options.maxBodyBytes) {
        return new ApiError(413, `The request body is ${length} bytes; the limit is ${options.maxBodyBytes}.`, "invalid_request_error", null, "request_too_large").toResponse();
      }
      if (!guarded(path)) return;
      try {
        const key = keys.check(request);
        if (limiter && path.startsWith("/v1/")) {
          const caller = key || server?.requestIP(request)?.address || "anonymous";
          callerOf.set(request, caller);
          limiter.admit(caller);
        }
      } catch (e) {
        return toApiError(e).toResponse();
      }
    })
    // Every body is read as JSON, whatever content-type a client sent (curl -d sends a form type).
    .onParse({ as: "global" }, async ({ request }) => {
      if (request.method === "GET" || request.method === "HEAD") return;
      const bytes = new Uint8Array(await request.arrayBuffer());
      if (bytes.byteLength > options.maxBodyBytes) throw new ApiError(413, `The request body is over ${options.maxBodyBytes} bytes.`, "invalid_request_error", null, "request_too_large");
      let text: string;
      try {
        text = new TextDecoder("utf-8", { fatal: true }).decode(bytes);
      } catch {
        throw new ApiError(400, "The request body is not valid UTF-8.", "invalid_request_error");
      }
      try {
        return JSON.parse(text);
      } catch {
        throw new ApiError(400, "We could not parse the JSON body of your request.", "invalid_request_error");
      }
    })
    .onError({ as: "global" }, ({ code, error }) => {
      if (error instanceof ApiError) return error.toResponse();
      switch (code) {
        case "VALIDATION": {
          const { message, param } = validationMessage(error);
          return new ApiError(400, message, "invalid_request_error", param).toResponse();
        }
        case "PARSE": {
          // Elysia wraps what the parse hook threw (invalid UTF-8, body too large).
          const cause = (error as { cause?: unknown }).cause;
          if (cause instanceof ApiError) return cause.toResponse();
          return new ApiError(400, "We could not parse the JSON body of your request.", "invalid_request_error").toResponse();
        }
        case "NOT_FOUND":
          return new ApiError(404, "Not found.", "invalid_request_error", null, "not_found").toResponse();
        default:
          return toApiError(error).toResponse();
      }
    })
    .use(docs)
    .use(ops)
    .use(completions)
    .use(websocket);
}
