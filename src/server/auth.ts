// API keys (compared in constant time) and per-key rate limits.
import { createHash, timingSafeEqual } from "node:crypto";
import { ApiError } from "./errors.ts";

const digest = (s: string) => createHash("sha256").update(s).digest();

export class ApiKeys {
  private readonly digests: Buffer[];
  constructor(keys: readonly string[]) {
    this.digests = keys.map(digest);
  }

  get enabled(): boolean {
    return this.digests.length > 0;
  }

  /** The key the request carries when it is valid, "" when keys are off; throws 401 otherwise. */
  check(request: Request, query: URLSearchParams): string {
    if (!this.enabled) return "";
    const header = request.headers.get("authorization") ?? "";
    const fromQuery = query.get("api_key"); // browsers cannot set WebSocket headers
    const key = header.toLowerCase().startsWith("bearer ") ? header.slice(7).trim() : (fromQuery ?? "");
    if (key === "")
      throw new ApiError(
        401,
        "You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY'.",
        "invalid_request_error",
        null,
        "missing_api_key",
      );
    const d = digest(key);
    // Every stored key is compared, so the time taken does not depend on which one matched.
    let ok = false;
    for (const k of this.digests) ok = timingSafeEqual(d, k) || ok;
    if (!ok) throw new ApiError(401, "Incorrect API key provided.", "invalid_request_error", null, "invalid_api_key");
    return key;
  }
}

export interface RateLimitConfig {
  requests: number; // per window
  windowMs: number;
  tokensPerMinute: number | null;
}

/** "60/min", "10/s", "1000/h" or a bare number (per minute). */
export function parseRateLimit(spec: string): { requests: number; windowMs: number } {
  const m = /^(\d+)\s*(?:\/\s*(s|sec|second|m|min|minute|h|hour))?$/.exec(spec.trim());
  if (!m || Number(m[1]) < 1) throw new Error(`--rate-limit '${spec}' is not N, N/s, N/min or N/h`);
  const unit = m[2] ?? "min";
  const windowMs = unit.startsWith("s") ? 1000 : unit.startsWith("h") ? 3_600_000 : 60_000;
  return { requests: Number(m[1]), windowMs };
}

interface Bucket {
  windowStart: number;
  requests: number;
  minuteStart: number;
  tokens: number;
}

const BUCKETS_MAX = 100_000;

export class RateLimiter {
  private readonly buckets = new Map<string, Bucket>();
  constructor(private readonly config: RateLimitConfig) {}

  private bucket(id: string, now: number): Bucket {
    let b = this.buckets.get(id);
    if (!b) {
      if (this.buckets.size >= BUCKETS_MAX) this.buckets.clear(); // bounded: forget everyone rather than grow
      b = { windowStart: now, requests: 0, minuteStart: now, tokens: 0 };
      this.buckets.set(id, b);
    }
    if (now - b.windowStart >= this.config.windowMs) {
      b.windowStart = now;
      b.requests = 0;
    }
    if (now - b.minuteStart >= 60_000) {
      b.minuteStart = now;
      b.tokens = 0;
    }
    return b;
  }

  /** Counts a request; throws 429 with Retry-After when the caller is over a limit. */
  admit(id: string, now = Date.now()): void {
    const b = this.bucket(id, now);
    const tpm = this.config.tokensPerMinute;
    if (tpm !== null && b.tokens >= tpm) {
      const retry = Math.ceil((b.minuteStart + 60_000 - now) / 1000);
      throw new ApiError(
        429,
        `Rate limit reached: ${tpm} tokens per minute.`,
        "rate_limit_error",
        null,
        "rate_limit_exceeded",
        { "retry-after": String(Math.max(1, retry)) },
      );
    }
    if (b.requests >= this.config.requests) {
      const retry = Math.ceil((b.windowStart + this.config.windowMs - now) / 1000);
      throw new ApiError(
        429,
        `Rate limit reached: ${this.config.requests} requests per ${this.config.windowMs / 1000} s.`,
        "rate_limit_error",
        null,
        "rate_limit_exceeded",
        {
          "retry-after": String(Math.max(1, retry)),
        },
      );
    }
    b.requests += 1;
  }

  /** Charges the tokens a finished request used. */
  charge(id: string, tokens: number, now = Date.now()): void {
    this.bucket(id, now).tokens += tokens;
  }
}
