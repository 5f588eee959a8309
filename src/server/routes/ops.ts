// Operations: liveness and readiness, version, metrics (Prometheus text or JSON), models.
import { Elysia } from "elysia";
import type { LLMEngine } from "../../engine/llm_engine.ts";
import type { ServerContext } from "../state.ts";
import { VERSION } from "../state.ts";
import { ErrorResponse, Health, ModelList, Version } from "../schemas.ts";

/** The GPU's utilization (0-1, null without NVML) and memory; nulls on the CPU. */
function gpuFields(engine: LLMEngine | null) {
  const info = engine?.native.device === "cuda" ? engine.native.deviceInfo() : null;
  return {
    gpu_utilization: info?.utilization ?? null,
    gpu_memory_used_bytes: info?.memoryUsedBytes ?? null,
    gpu_memory_total_bytes: info?.memoryTotalBytes ?? null,
  };
}

function wantsPrometheus(accept: string | null): boolean {
  return accept !== null && /text\/plain|openmetrics/.test(accept);
}

export function opsRoutes({ state, options }: ServerContext) {
  return new Elysia({ name: "ops" })
    .get("/live", () => ({ status: "ok" }), {
      response: Health,
      detail: { summary: "Liveness: 200 while the process serves, also while loading and draining" },
    })
    .get(
      "/health",
      ({ set }) => {
        if (state.status !== "ready") set.status = 503;
        return { status: state.status === "ready" ? "ok" : state.status };
      },
      {
        response: { 200: Health, 503: Health },
        detail: { summary: "Liveness and readiness: 503 while loading or draining" },
      },
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
          const m = engine
            ? await engine.metrics.registry.getSingleMetric(engine.metrics.name(name))?.get()
            : undefined;
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
          ...gpuFields(engine),
          prompt_tokens_total: await scalar("prompt_tokens_total"),
          generation_tokens_total: await scalar("generation_tokens_total"),
          num_preemptions_total: await scalar("num_preemptions_total"),
          prefix_cache_queries_total: await scalar("prefix_cache_queries_total"),
          prefix_cache_hits_total: await scalar("prefix_cache_hits_total"),
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
          ? [
              {
                id: options.servedModelName,
                object: "model" as const,
                created: Math.floor(state.startedMs / 1000),
                owned_by: "inferneo",
                max_model_len: state.engine.maxModelLen,
              },
            ]
          : [],
      }),
      { response: { 200: ModelList, 401: ErrorResponse } },
    );
}
