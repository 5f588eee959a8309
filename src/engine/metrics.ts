// Engine metrics, in vLLM's names under the `inferneo:` prefix (or `vllm:`, for the
// routers and the inference gateway's endpoint picker that read vLLM's names without
// configuration), on a registry of their own (two engines in one process do not collide).
// Every value is read from fields the event loop holds: a scrape never waits on a step.
import { Counter, Gauge, Histogram, Registry } from "prom-client";

const LATENCY_BUCKETS_S = [
  0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40, 80,
];

export interface EngineGauges {
  numRunning(): number;
  numWaiting(): number;
  kvCacheUsage(): number;
  /** The GPU's utilization (0..1, null where NVML is absent) and memory; null on the CPU. */
  gpu: (() => { utilization: number | null; memoryUsedBytes: number; memoryTotalBytes: number }) | null;
}

export type MetricsPrefix = "inferneo" | "vllm";

/** What the cache is, for cache_config_info's labels. */
export interface CacheConfig {
  blockSizeTokens: number;
  numBlocks: number;
  enablePrefixCaching: boolean;
}

export class EngineMetrics {
  readonly registry = new Registry();
  readonly promptTokens: Counter;
  readonly generationTokens: Counter;
  readonly preemptions: Counter;
  readonly prefixCacheQueries: Counter;
  readonly prefixCacheHits: Counter;
  readonly requestSuccess: Counter<"finished_reason">;
  readonly timeToFirstToken: Histogram;
  readonly interTokenLatency: Histogram;
  readonly e2eLatency: Histogram;
  readonly queueTime: Histogram;

  /** A metric's full name: "prompt_tokens_total" -> "inferneo:prompt_tokens_total". */
  name(short: string): string {
    return `${this.prefix}:${short}`;
  }

  constructor(
    gauges: EngineGauges,
    modelName: string,
    cache: CacheConfig,
    readonly prefix: MetricsPrefix = "inferneo",
  ) {
    const r = [this.registry];
    const p = prefix;
    this.registry.setDefaultLabels({ model_name: modelName });
    new Gauge({
      name: `${p}:num_requests_running`,
      help: "Requests in the running set.",
      registers: r,
      collect() {
        this.set(gauges.numRunning());
      },
    });
    new Gauge({
      name: `${p}:num_requests_waiting`,
      help: "Requests waiting to be scheduled.",
      registers: r,
      collect() {
        this.set(gauges.numWaiting());
      },
    });
    new Gauge({
      name: `${p}:kv_cache_usage_perc`,
      help: "Fraction of KV blocks in use (1 = full).",
      registers: r,
      collect() {
        this.set(gauges.kvCacheUsage());
      },
    });
    new Gauge({
      name: `${p}:gpu_cache_usage_perc`,
      help: "The same as kv_cache_usage_perc, under the name older routers read.",
      registers: r,
      collect() {
        this.set(gauges.kvCacheUsage());
      },
    });
    const gpu = gauges.gpu;
    if (gpu !== null) {
      for (const [name, help, read] of [
        ["gpu_utilization", "The GPU's utilization over NVML's last sample (0-1).", () => gpu().utilization ?? NaN],
        ["gpu_memory_used_bytes", "Device memory in use, by every process.", () => gpu().memoryUsedBytes],
        ["gpu_memory_total_bytes", "Device memory.", () => gpu().memoryTotalBytes],
      ] as const) {
        new Gauge({
          name: `${p}:${name}`,
          help,
          registers: r,
          collect() {
            this.set(read());
          },
        });
      }
    }
    const info = new Gauge({
      name: `${p}:cache_config_info`,
      help: "The KV cache's configuration, as labels.",
      labelNames: ["block_size", "num_gpu_blocks", "enable_prefix_caching"],
      registers: r,
    });
    info.set(
      {
        block_size: String(cache.blockSizeTokens),
        num_gpu_blocks: String(cache.numBlocks),
        enable_prefix_caching: String(cache.enablePrefixCaching),
      },
      1,
    );
    this.promptTokens = new Counter({
      name: `${p}:prompt_tokens_total`,
      help: "Prompt tokens processed.",
      registers: r,
    });
    this.generationTokens = new Counter({
      name: `${p}:generation_tokens_total`,
      help: "Tokens generated.",
      registers: r,
    });
    this.preemptions = new Counter({
      name: `${p}:num_preemptions_total`,
      help: "Preemptions of running requests.",
      registers: r,
    });
    this.prefixCacheQueries = new Counter({
      name: `${p}:prefix_cache_queries_total`,
      help: "Prompt tokens looked up in the prefix cache.",
      registers: r,
    });
    this.prefixCacheHits = new Counter({
      name: `${p}:prefix_cache_hits_total`,
      help: "Prompt tokens served from the prefix cache.",
      registers: r,
    });
    this.requestSuccess = new Counter({
      name: `${p}:request_success_total`,
      help: "Finished requests by finish reason.",
      labelNames: ["finished_reason"],
      registers: r,
    });
    this.timeToFirstToken = new Histogram({
      name: `${p}:time_to_first_token_seconds`,
      help: "Time to first token.",
      buckets: LATENCY_BUCKETS_S,
      registers: r,
    });
    this.interTokenLatency = new Histogram({
      name: `${p}:inter_token_latency_seconds`,
      help: "Time between consecutive output tokens.",
      buckets: LATENCY_BUCKETS_S,
      registers: r,
    });
    this.e2eLatency = new Histogram({
      name: `${p}:e2e_request_latency_seconds`,
      help: "Arrival to finish.",
      buckets: LATENCY_BUCKETS_S,
      registers: r,
    });
    this.queueTime = new Histogram({
      name: `${p}:request_queue_time_seconds`,
      help: "Arrival to first scheduled.",
      buckets: LATENCY_BUCKETS_S,
      registers: r,
    });
  }
}
