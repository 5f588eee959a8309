// Server-Sent Events: `data: {chunk}` frames, `data: [DONE]`, `: ping` comments while
// a stream is thinking, and an error frame once the status is sent. A client that
// goes away cancels the request (its KV blocks come back at once).
import { toApiError } from "./errors.ts";

const SSE_HEADERS = {
  "content-type": "text/event-stream; charset=utf-8",
  "cache-control": "no-cache",
  connection: "keep-alive",
  "x-accel-buffering": "no",
};

export function sse(
  chunks: AsyncGenerator<unknown>,
  cancel: () => void,
  heartbeatMs: number,
  headers: Record<string, string> = {},
): Response {
  const encoder = new TextEncoder();
  let heartbeat: ReturnType<typeof setInterval> | undefined;
  const end = (controller: ReadableStreamDefaultController<Uint8Array>) => {
    controller.enqueue(encoder.encode("data: [DONE]\n\n"));
    clearInterval(heartbeat);
    controller.close();
  };
  const stream = new ReadableStream<Uint8Array>({
    start(controller) {
      // Comments keep proxies and idle timeouts from closing a stream that is thinking.
      heartbeat = setInterval(() => controller.enqueue(encoder.encode(": ping\n\n")), heartbeatMs);
    },
    async pull(controller) {
      try {
        const next = await chunks.next();
        if (next.done) return end(controller);
        controller.enqueue(encoder.encode(`data: ${JSON.stringify(next.value)}\n\n`));
      } catch (e) {
        // Once the stream has begun the status is sent; the error travels as a frame.
        controller.enqueue(encoder.encode(`data: ${JSON.stringify(toApiError(e).body)}\n\n`));
        cancel();
        end(controller);
      }
    },
    cancel() {
      clearInterval(heartbeat);
      cancel();
      void chunks.return(undefined);
    },
  });
  return new Response(stream, { headers: { ...SSE_HEADERS, ...headers } });
}
