// Sampling parameters from the snake_case names users write (JSONL files, HTTP bodies).
import { DEFAULT_SAMPLING, type SamplingParams } from "./request.ts";

export interface SnakeSampling {
  max_tokens?: number;
  min_tokens?: number;
  temperature?: number;
  top_p?: number;
  top_k?: number | null;
  min_p?: number;
  presence_penalty?: number;
  frequency_penalty?: number;
  repetition_penalty?: number;
  logit_bias?: Record<string, number> | null;
  seed?: number | null;
  stop?: string | string[] | null;
  stop_token_ids?: number[] | null;
  ignore_eos?: boolean;
  logprobs?: number | null;
}

export function samplingFromSnake(s: SnakeSampling, defaults: SamplingParams = DEFAULT_SAMPLING): SamplingParams {
  const bias: Record<number, number> | null = s.logit_bias
    ? Object.fromEntries(Object.entries(s.logit_bias).map(([k, v]) => [Number(k), v]))
    : null;
  return {
    maxTokens: s.max_tokens ?? defaults.maxTokens,
    minTokens: s.min_tokens ?? defaults.minTokens,
    temperature: s.temperature ?? defaults.temperature,
    topP: s.top_p ?? defaults.topP,
    // vLLM and OpenAI clients send -1 for "off".
    topK: s.top_k === undefined || s.top_k === null || s.top_k === -1 ? defaults.topK : s.top_k,
    minP: s.min_p ?? defaults.minP,
    presencePenalty: s.presence_penalty ?? defaults.presencePenalty,
    frequencyPenalty: s.frequency_penalty ?? defaults.frequencyPenalty,
    repetitionPenalty: s.repetition_penalty ?? defaults.repetitionPenalty,
    logitBias: bias ?? defaults.logitBias,
    seed: s.seed ?? defaults.seed,
    stop: s.stop === undefined || s.stop === null ? defaults.stop : typeof s.stop === "string" ? [s.stop] : s.stop,
    stopTokenIds: s.stop_token_ids ?? defaults.stopTokenIds,
    ignoreEos: s.ignore_eos ?? defaults.ignoreEos,
    logprobs: s.logprobs === undefined ? defaults.logprobs : s.logprobs,
  };
}
