// The HTTP and WebSocket server: one Elysia app composed of route modules (routes/),
// with what every request passes first (origin, size, key, rate limit: guard.ts),
// one body parser (body.ts), one validation (validation.ts), and every error in
// OpenAI's shape.
import type { Server } from "bun";
import { Elysia, type AnyElysia } from "elysia";
import { parseJsonBytes, readBody, tooLarge } from "./body.ts";
import { ApiError, toApiError } from "./errors.ts";
import { Guard, splitUrl } from "./guard.ts";
import { completionRoutes } from "./routes/completions.ts";
import { docsRoutes } from "./routes/docs.ts";
import { opsRoutes } from "./routes/ops.ts";
import { tokenizeRoutes } from "./routes/tokenize.ts";
import { websocketRoutes } from "./routes/websocket.ts";
import type { ServerContext, ServerOptions, ServerState } from "./state.ts";
import { validationError } from "./validation.ts";

export { DEFAULT_SERVER_OPTIONS, ServerState, VERSION, type ServerOptions } from "./state.ts";

/** Header bytes as they came (names, values and their separators). */
function headerBytes(request: Request): number {
  let n = request.url.length;
  request.headers.forEach((value, name) => (n += name.length + value.length + 4));
  return n;
}

/** Methods each path answers, for 405s (a path's other methods are not "not found"). */
function methodsByPath(app: AnyElysia): Map<string, string[]> {
  const byPath = new Map<string, string[]>();
  for (const r of app.routes as { method: string; path: string }[]) {
    if (r.method === "WS") continue;
    byPath.set(r.path, [...(byPath.get(r.path) ?? []), r.method]);
  }
  return byPath;
}

/** What every request passes before its route: a Response refuses it. */
function screen(ctx: ServerContext, request: Request, server: Server<unknown> | null): Response | undefined {
  const { guard, options } = ctx;
  const { path } = splitUrl(request.url);
  try {
    if (request.method === "OPTIONS" && request.headers.has("access-control-request-method"))
      return guard.preflight(request);
    guard.checkOrigin(request);
    if (headerBytes(request) > options.maxHeaderBytes) {
      throw new ApiError(
        431,
        `The request's headers are over the limit of ${options.maxHeaderBytes} bytes.`,
        "invalid_request_error",
        null,
        "headers_too_large",
      );
    }
    const length = Number(request.headers.get("content-length") ?? 0);
    if (length > options.maxBodyBytes) throw tooLarge(options.maxBodyBytes);
    // A WebSocket upgrade needs the key; each message on it is counted, not the upgrade.
    if (guard.guarded(path))
      guard.admit(request, server, request.headers.get("upgrade")?.toLowerCase() !== "websocket");
  } catch (e) {
    const error = toApiError(e);
    return Response.json(error.body, {
      status: error.status,
      headers: { ...error.headers, ...guard.corsHeaders(request) },
    });
  }
}

export function createApp(state: ServerState, options: ServerOptions) {
  const ctx: ServerContext = { state, options, guard: new Guard(options) };
  let methods: Map<string, string[]> | null = null;
  const app: AnyElysia = new Elysia({ normalize: false })
    .onRequest(({ request, server, set }) => {
      const refused = screen(ctx, request, server);
      if (refused) return refused;
      Object.assign(set.headers, ctx.guard.corsHeaders(request));
    })
    // Every body is read as JSON, whatever content-type a client sent (curl -d sends a form type).
    .onParse({ as: "global" }, async ({ request }) => {
      if (request.method === "GET" || request.method === "HEAD") return;
      return parseJsonBytes(await readBody(request, options.maxBodyBytes));
    })
    .onError({ as: "global" }, ({ code, error, request }) => {
      if (error instanceof ApiError) return error.toResponse();
      switch (code) {
        case "VALIDATION":
          return validationError(error.all).toResponse();
        case "PARSE": {
          // Elysia wraps what the parse hook threw (invalid UTF-8, too deep, too large).
          const cause = (error as { cause?: unknown }).cause;
          if (cause instanceof ApiError) return cause.toResponse();
          return new ApiError(400, "We could not parse the JSON request body.", "invalid_request_error").toResponse();
        }
        case "NOT_FOUND": {
          const allowed = (methods ??= methodsByPath(app)).get(splitUrl(request.url).path);
          if (allowed) {
            const e = new ApiError(
              405,
              `Method ${request.method} is not allowed here; use ${allowed.join(" or ")}.`,
              "invalid_request_error",
              null,
              "method_not_allowed",
              {
                allow: allowed.join(", "),
              },
            );
            return e.toResponse();
          }
          return new ApiError(404, "Not found.", "invalid_request_error", null, "not_found").toResponse();
        }
        default:
          return toApiError(error).toResponse();
      }
    })
    .use(docsRoutes(ctx, () => app))
    .use(opsRoutes(ctx))
    .use(tokenizeRoutes(ctx))
    .use(completionRoutes(ctx))
    .use(websocketRoutes(ctx));
  return app;
}
