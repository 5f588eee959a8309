// What every request passes before its route: the browser-origin check (CORS), the
// API key, and the rate limit. One place, for HTTP routes and WebSocket messages alike.
import type { Server } from "bun";
import { ApiKeys, RateLimiter, type RateLimitConfig } from "./auth.ts";
import { ApiError } from "./errors.ts";

/** The path and query of a request, without URL parsing (a bad Host header makes request.url unparsable). */
export function splitUrl(url: string): { path: string; query: URLSearchParams } {
  const scheme = url.indexOf("://");
  const slash = url.indexOf("/", scheme < 0 ? 0 : scheme + 3);
  const rest = slash < 0 ? "/" : url.slice(slash);
  const q = rest.indexOf("?");
  return q < 0
    ? { path: rest, query: new URLSearchParams() }
    : { path: rest.slice(0, q), query: new URLSearchParams(rest.slice(q + 1)) };
}

const forbidden = (message: string) => new ApiError(403, message, "invalid_request_error", null, "forbidden_origin");

export interface GuardOptions {
  apiKeys: string[];
  protectMetrics: boolean;
  rateLimit: RateLimitConfig | null;
  allowedOrigins: string[]; // "*" allows any
}

export class Guard {
  private readonly keys: ApiKeys;
  private readonly limiter: RateLimiter | null;
  private readonly callers = new WeakMap<Request, string>();

  constructor(private readonly options: GuardOptions) {
    this.keys = new ApiKeys(options.apiKeys);
    this.limiter = options.rateLimit ? new RateLimiter(options.rateLimit) : null;
  }

  /** Routes that need a key and count against the rate limit. */
  guarded(path: string): boolean {
    return (
      path.startsWith("/v1/") ||
      path === "/tokenize" ||
      path === "/detokenize" ||
      (this.options.protectMetrics && path === "/metrics")
    );
  }

  private originAllowed(origin: string): boolean {
    return this.options.allowedOrigins.includes("*") || this.options.allowedOrigins.includes(origin);
  }

  /**
   * A browser's request from another site is refused unless its origin is allowed: a page
   * can POST text/plain to a local server without a preflight. Browsers say where a request
   * comes from (Origin, Sec-Fetch-Site); curl and SDKs send neither and pass.
   */
  checkOrigin(request: Request): void {
    const origin = request.headers.get("origin");
    const site = request.headers.get("sec-fetch-site");
    const host = request.headers.get("host");
    const sameOrigin =
      origin !== null && host !== null && (origin === `http://${host}` || origin === `https://${host}`);
    if (origin !== null && origin !== "null" && sameOrigin) return;
    if (origin !== null && this.originAllowed(origin)) return;
    if (origin !== null) throw forbidden(`Requests from origin ${origin} are not allowed (see --allowed-origins).`);
    // No Origin: a navigation, or a no-cors GET from a page; only the first is let through.
    const navigation = request.headers.get("sec-fetch-mode") === "navigate" && request.method === "GET";
    if ((site === "cross-site" || site === "same-site") && !navigation && !this.options.allowedOrigins.includes("*")) {
      throw forbidden("Cross-site requests are not allowed (see --allowed-origins).");
    }
  }

  /** Headers that let an allowed origin read the answer (none for others). */
  corsHeaders(request: Request): Record<string, string> {
    const origin = request.headers.get("origin");
    if (origin === null || !this.originAllowed(origin)) return {};
    return {
      "access-control-allow-origin": origin,
      vary: "Origin",
      "access-control-expose-headers": "retry-after, x-request-id",
    };
  }

  /** The answer to a CORS preflight (OPTIONS with Access-Control-Request-Method). */
  preflight(request: Request): Response {
    const origin = request.headers.get("origin");
    if (origin === null || !this.originAllowed(origin))
      return forbidden(`Requests from origin ${origin} are not allowed (see --allowed-origins).`).toResponse();
    return new Response(null, {
      status: 204,
      headers: {
        ...this.corsHeaders(request),
        "access-control-allow-methods": "GET, POST, OPTIONS",
        "access-control-allow-headers":
          request.headers.get("access-control-request-headers") ?? "authorization, content-type",
        "access-control-max-age": "600",
      },
    });
  }

  /**
   * The key check and, for requests that do work, the rate limit's count. Returns the
   * caller (its key, or its address when keys are off) for charging tokens later.
   */
  admit(request: Request, server: Server<unknown> | null, countRequest: boolean): string {
    const key = this.keys.check(request, splitUrl(request.url).query);
    const caller = key || server?.requestIP(request)?.address || "anonymous";
    this.callers.set(request, caller);
    if (countRequest) this.limiter?.admit(caller);
    return caller;
  }

  /** Counts one more request of a caller already admitted (each message on a WebSocket). */
  admitAnother(caller: string): void {
    this.limiter?.admit(caller);
  }

  callerOf(request: Request): string {
    return this.callers.get(request) ?? "anonymous";
  }

  /** Charges tokens a request used to its caller's per-minute budget. */
  charge(caller: string, tokens: number): void {
    this.limiter?.charge(caller, tokens);
  }
}
