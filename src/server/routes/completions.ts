// The OpenAI routes: completions, chat completions (JSON or SSE) and the batch route.
// Each prepares, starts, and either streams the service's chunks or folds them; every
// one charges the tokens it used to its caller, however it ends.
import type { Server } from "bun";
import { Elysia } from "elysia";
import type { OpenAIService, Running } from "../openai.ts";
import { sse } from "../sse.ts";
import type { ServerContext } from "../state.ts";
import {
  BatchCompletionRequest,
  BatchCompletionResponse,
  ChatCompletionRequest,
  ChatCompletionResponse,
  CompletionRequest,
  CompletionResponse,
  ErrorResponse,
} from "../schemas.ts";

export function completionRoutes({ state, options, guard }: ServerContext) {
  const charge = (request: Request, running: Running) =>
    guard.charge(guard.callerOf(request), running.usage().total_tokens);

  /** Streams as SSE or answers once, with the same chunks either way. */
  async function answer(
    service: OpenAIService,
    running: Running,
    stream: boolean,
    request: Request,
    server: Server<unknown> | null,
  ): Promise<Response> {
    if (stream) {
      const chunks = (async function* () {
        try {
          yield* service.chunks(running);
        } finally {
          charge(request, running);
        }
      })();
      return sse(chunks, running.cancel, options.heartbeatMs);
    }
    return Response.json(await whole(running, request, server, () => service.collect(running)));
  }

  /**
   * A non-streamed answer computes for longer than the idle timeout with nothing to send:
   * lift the timeout for it, abort its work if the client leaves, charge it however it ends.
   */
  async function whole<T>(
    running: Running,
    request: Request,
    server: Server<unknown> | null,
    fold: () => Promise<T>,
  ): Promise<T> {
    server?.timeout(request, 0);
    request.signal.addEventListener("abort", running.cancel);
    try {
      return await fold();
    } finally {
      charge(request, running);
    }
  }

  const errors = { 400: ErrorResponse, 401: ErrorResponse, 404: ErrorResponse, 429: ErrorResponse, 503: ErrorResponse };
  return new Elysia({ name: "completions" })
    .post(
      "/v1/completions",
      async ({ body, request, server }) => {
        const service = state.serving();
        const running = service.start(await service.prepareCompletion(body));
        return answer(service, running, body.stream === true, request, server);
      },
      {
        body: CompletionRequest,
        response: { 200: CompletionResponse, ...errors },
        detail: { summary: "Text completion (stream: SSE)" },
      },
    )
    .post(
      "/v1/chat/completions",
      async ({ body, request, server }) => {
        const service = state.serving();
        const running = service.start(await service.prepareChat(body));
        return answer(service, running, body.stream === true, request, server);
      },
      {
        body: ChatCompletionRequest,
        response: { 200: ChatCompletionResponse, ...errors },
        detail: {
          summary: "Chat completion (stream: SSE)",
          description:
            "A WebSocket on the same path streams the same chunks; see the protocol in this document's description.",
        },
      },
    )
    .post(
      "/v1/completions/batch",
      async ({ body, request, server }) => {
        const service = state.serving();
        const running = service.start(await service.prepareBatch(body));
        const data = await whole(running, request, server, () => service.collectBatch(running, body.n ?? 1));
        return { object: "list" as const, data };
      },
      {
        body: BatchCompletionRequest,
        response: { 200: BatchCompletionResponse, ...errors },
        detail: { summary: "Several prompts at once, one completion each, in order" },
      },
    );
}
