// Engine metrics, in vLLM's names with the `inferneo:` prefix, on a registry of their
// own (so two engines in one process, as in tests, do not collide).
import { Counter, Gauge, Histogram, Registry } from "prom-client";

const LATENCY_BUCKETS_S = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40, 80];

export interface EngineGauges {
  numRunning(): number;
  numWaiting(): number;
  kvCacheUsage(): number;
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

  constructor(gauges: EngineGauges, modelName: string) {
    const r = [this.registry];
    this.registry.setDefaultLabels({ model_name: modelName });
    new Gauge({ name: "inferneo:num_requests_running", help: "Requests in the running set.", registers: r, collect() { this.set(gauges.numRunning()); } });
    new Gauge({ name: "inferneo:num_requests_waiting", help: "Requests waiting to be scheduled.", registers: r, collect() { this.set(gauges.numWaiting()); } });
    new Gauge({ name: "inferneo:kv_cache_usage_perc", help: "Fraction of KV blocks in use (1 = full).", registers: r, collect() { this.set(gauges.kvCacheUsage()); } });
    this.promptTokens = new Counter({ name: "inferneo:prompt_tokens_total", help: "Prompt tokens processed.", registers: r });
    this.generationTokens = new Counter({ name: "inferneo:generation_tokens_total", help: "Tokens generated.", registers: r });
    this.preemptions = new Counter({ name: "inferneo:num_preemptions_total", help: "Preemptions of running requests.", registers: r });
    this.prefixCacheQueries = new Counter({ name: "inferneo:prefix_cache_queries_total", help: "Prompt tokens looked up in the prefix cache.", registers: r });
    this.prefixCacheHits = new Counter({ name: "inferneo:prefix_cache_hits_total", help: "Prompt tokens served from the prefix cache.", registers: r });
    this.requestSuccess = new Counter({ name: "inferneo:request_success_total", help: "Finished requests by finish reason.", labelNames: ["finished_reason"], registers: r });
    this.timeToFirstToken = new Histogram({ name: "inferneo:time_to_first_token_seconds", help: "Time to first token.", buckets: LATENCY_BUCKETS_S, registers: r });
    this.interTokenLatency = new Histogram({ name: "inferneo:inter_token_latency_seconds", help: "Time between consecutive output tokens.", buckets: LATENCY_BUCKETS_S, registers: r });
    this.e2eLatency = new Histogram({ name: "inferneo:e2e_request_latency_seconds", help: "Arrival to finish.", buckets: LATENCY_BUCKETS_S, registers: r });
    this.queueTime = new Histogram({ name: "inferneo:request_queue_time_seconds", help: "Arrival to first scheduled.", buckets: LATENCY_BUCKETS_S, registers: r });
  }
}
