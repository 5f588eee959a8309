// Every failure the API reports, in OpenAI's shape: {"error": {message, type, param, code}}.
import { QueueFullError } from "../engine/scheduler.ts";
import { InvalidRequestError } from "../engine/llm_engine.ts";

export class ApiError extends Error {
  constructor(
    readonly status: number,
    message: string,
    readonly type: string = "invalid_request_error",
    readonly param: string | null = null,
    readonly code: string | null = null,
    readonly headers: Record<string, string> = {},
  ) {
    super(message);
    this.name = "ApiError";
  }

  get body() {
    return { error: { message: this.message, type: this.type, param: this.param, code: this.code } };
  }

  toResponse(): Response {
    return Response.json(this.body, { status: this.status, headers: this.headers });
  }
}

export const notFoundModel = (model: string) =>
  new ApiError(404, `The model \`${model}\` does not exist.`, "invalid_request_error", "model", "model_not_found");

export const unavailable = (why: "loading" | "draining") =>
  new ApiError(
    503,
    why === "loading" ? "The model is still loading; try again shortly." : "The server is shutting down.",
    "service_unavailable",
    null,
    why,
    { "retry-after": "5" },
  );

/** Maps anything thrown while serving a request to an ApiError. */
export function toApiError(e: unknown): ApiError {
  if (e instanceof ApiError) return e;
  if (e instanceof InvalidRequestError) return new ApiError(400, e.message, "invalid_request_error", e.param, null);
  if (e instanceof QueueFullError)
    return new ApiError(429, e.message, "rate_limit_error", null, "queue_full", { "retry-after": "1" });
  return new ApiError(500, `internal error: ${(e as Error)?.message ?? String(e)}`, "internal_error", null, null);
}
