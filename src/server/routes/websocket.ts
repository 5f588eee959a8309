// Chat over a WebSocket on /v1/chat/completions. Each text message is one chat request
// (the POST body, plus an optional `request_id` of the client's); requests on one socket
// run concurrently, and every frame of a request carries its request_id:
//   -> {"request_id": "a", "model": ..., "messages": [...]}
//   <- {"request_id": "a", "object": "chat.completion.chunk", ...}   (as many as SSE sends)
//   <- {"request_id": "a", "done": true}    ("[DONE]" for a request sent without an id)
//   <- {"request_id": "a", "error": {...}}  (a refused or failed request; the socket stays open)
// Each message is checked, counted and charged as an HTTP request is.
import { Elysia } from "elysia";
import { parseJsonText } from "../body.ts";
import { ApiError, toApiError } from "../errors.ts";
import type { Running } from "../openai.ts";
import type { ServerContext } from "../state.ts";
import { ChatCompletionRequest } from "../schemas.ts";
import { checkBody } from "../validation.ts";

/** Requests one socket may have running at once; more is answered with a 429 frame. */
export const WS_REQUESTS_IN_FLIGHT_MAX = 16;
const REQUEST_ID_CHARS_MAX = 128;

interface Socket {
  caller: string;
  running: Set<Running>;
}

/** The request_id a message carries, taken out of the chat request. */
function takeRequestId(body: unknown): string | null {
  if (body === null || typeof body !== "object" || Array.isArray(body) || !("request_id" in body)) return null;
  const id = (body as { request_id: unknown }).request_id;
  delete (body as { request_id?: unknown }).request_id;
  if (typeof id !== "string" || id.length === 0 || id.length > REQUEST_ID_CHARS_MAX) {
    throw new ApiError(
      400,
      `request_id must be a non-empty string of at most ${REQUEST_ID_CHARS_MAX} characters`,
      "invalid_request_error",
      "request_id",
    );
  }
  return id;
}

export function websocketRoutes({ state, options, guard }: ServerContext) {
  return new Elysia({ name: "ws" }).ws("/v1/chat/completions", {
    // Messages are parsed here, not by Elysia, so that bad JSON gets an error frame, not a closed socket.
    parse: (_ws, message) => message,
    maxPayloadLength: options.maxBodyBytes,
    open(ws) {
      const data = ws.data as unknown as { request: Request } & Partial<Socket>;
      data.caller = guard.callerOf(data.request);
      data.running = new Set();
    },
    async message(ws, message) {
      const socket = ws.data as unknown as Socket;
      let requestId: string | null = null;
      const send = (v: Record<string, unknown>) =>
        ws.send(JSON.stringify(requestId === null ? v : { request_id: requestId, ...v }));
      let running: Running | null = null;
      try {
        const text =
          typeof message === "string"
            ? message
            : message instanceof Uint8Array || message instanceof ArrayBuffer
              ? new TextDecoder().decode(message)
              : JSON.stringify(message);
        const raw = parseJsonText(text, "message");
        requestId = takeRequestId(raw);
        const body = checkBody(ChatCompletionRequest, raw, "message");
        if (socket.running.size >= WS_REQUESTS_IN_FLIGHT_MAX) {
          throw new ApiError(
            429,
            `${WS_REQUESTS_IN_FLIGHT_MAX} requests are already running on this socket.`,
            "rate_limit_error",
            null,
            "too_many_requests",
          );
        }
        guard.admitAnother(socket.caller);
        const service = state.serving();
        running = service.start(await service.prepareChat(body));
        socket.running.add(running);
        try {
          for await (const chunk of service.chunks(running)) send(chunk as unknown as Record<string, unknown>);
        } finally {
          guard.charge(socket.caller, running.usage().total_tokens);
        }
        if (requestId === null) ws.send("[DONE]");
        else send({ done: true });
      } catch (e) {
        send(toApiError(e).body);
      } finally {
        if (running) {
          running.cancel();
          socket.running.delete(running);
        }
      }
    },
    close(ws) {
      for (const r of (ws.data as unknown as Partial<Socket>).running ?? []) r.cancel();
    },
  });
}
