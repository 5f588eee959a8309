// What the routes share: the server's options, its guard, and its state (loading,
// ready, draining), so that /health answers 503 while the model loads and drains.
import { readFileSync } from "node:fs";
import { join } from "node:path";
import type { LLMEngine } from "../engine/llm_engine.ts";
import type { RateLimitConfig } from "./auth.ts";
import { unavailable } from "./errors.ts";
import type { Guard } from "./guard.ts";
import { OpenAIService } from "./openai.ts";

export const VERSION = (
  JSON.parse(readFileSync(join(import.meta.dir, "..", "..", "package.json"), "utf8")) as { version: string }
).version;

export interface ServerOptions {
  servedModelName: string;
  apiKeys: string[];
  protectMetrics: boolean;
  rateLimit: RateLimitConfig | null;
  maxBodyBytes: number;
  maxHeaderBytes: number;
  maxSeqsPerRequest: number; // prompts x n of one API call
  allowedOrigins: string[]; // browser origins allowed to call (CORS); "*" for any
  heartbeatMs: number;
}

export const DEFAULT_SERVER_OPTIONS: ServerOptions = {
  servedModelName: "model",
  apiKeys: [],
  protectMetrics: false,
  rateLimit: null,
  maxBodyBytes: 8 * 1024 * 1024,
  maxHeaderBytes: 32 * 1024,
  maxSeqsPerRequest: 256,
  allowedOrigins: [],
  heartbeatMs: 15_000,
};

export class ServerState {
  status: "loading" | "ready" | "draining" = "loading";
  engine: LLMEngine | null = null;
  service: OpenAIService | null = null;
  readonly startedMs = Date.now();

  ready(engine: LLMEngine, options: ServerOptions): void {
    this.engine = engine;
    this.service = new OpenAIService(engine, options.servedModelName, { maxSeqsPerRequest: options.maxSeqsPerRequest });
    this.status = "ready";
  }

  /** The service, or 503 while loading or draining. */
  serving(): OpenAIService {
    if (this.status !== "ready" || this.service === null)
      throw unavailable(this.status === "draining" ? "draining" : "loading");
    return this.service;
  }
}

/** What every route module is built from. */
export interface ServerContext {
  state: ServerState;
  options: ServerOptions;
  guard: Guard;
}
