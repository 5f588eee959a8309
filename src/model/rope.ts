// RoPE scaling: the rotation frequencies of each head's pairs, as the model was trained to
// read them past (or within) its original context. Worked out here, once, from config.json's
// `rope_scaling` or GGUF's keys and `rope_freqs` tensor; the engine only tabulates cos/sin of
// position x frequency. Keys are rotated once into a paged cache, so every scheme is static:
// `dynamic` uses vLLM's fixed base for the longest context, as vLLM does.
import { ModelLoadError } from "./errors.ts";

export type RopeScaling =
  | { type: "linear"; factor: number }
  | { type: "dynamic"; factor: number; originalMaxPosition: number }
  | { type: "llama3"; factor: number; lowFreqFactor: number; highFreqFactor: number; originalMaxPosition: number }
  | {
      type: "yarn";
      factor: number;
      originalMaxPosition: number;
      betaFast: number;
      betaSlow: number;
      attnFactor: number | null; // null: 0.1 ln(factor) + 1
      truncate: boolean;
    }
  | { type: "factors"; factors: Float64Array } // per-pair divisors (GGUF's rope_freqs tensor)
  | {
      type: "longrope"; // Phi-3: per-pair divisors for short contexts and for long ones
      short: Float64Array;
      long: Float64Array;
      originalMaxPosition: number;
      maxPosition: number;
      attnFactor: number | null; // null: sqrt(1 + ln(max / original) / ln(original))
    };

export const SUPPORTED_ROPE_SCALING = "linear, dynamic, llama3, yarn, longrope";

/** The unscaled frequencies: theta^(-2i / head_dim). */
export function baseFrequencies(theta: number, headDim: number): Float64Array {
  return Float64Array.from({ length: headDim / 2 }, (_, i) => 1 / theta ** ((2 * i) / headDim));
}

/**
 * The frequencies and the cos/sin factor a scaling gives (none: theta's own, factor 1), for a
 * context of `contextLen` tokens: LongRoPE takes its long factors only past the original
 * context (transformers switches per sequence length, which a paged cache cannot follow; so
 * does llama.cpp, by its context size, as here).
 */
export function ropeFrequencies(
  theta: number,
  headDim: number,
  scaling: RopeScaling | null,
  contextLen: number,
): { invFreq: Float64Array | null; attnFactor: number } {
  if (scaling === null) return { invFreq: null, attnFactor: 1 };
  const base = baseFrequencies(theta, headDim);
  switch (scaling.type) {
    case "linear":
      return { invFreq: base.map((f) => f / scaling.factor), attnFactor: 1 };
    case "dynamic": {
      // vLLM's DynamicNTKScalingRotaryEmbedding at its longest context (factor x original).
      const f = scaling.factor;
      const grown = theta * (f * f - (f - 1)) ** (headDim / (headDim - 2));
      return { invFreq: baseFrequencies(grown, headDim), attnFactor: 1 };
    }
    case "factors":
      return { invFreq: base.map((f, i) => f / scaling.factors[i]), attnFactor: 1 };
    case "longrope": {
      const factors = contextLen > scaling.originalMaxPosition ? scaling.long : scaling.short;
      const scale = scaling.maxPosition / scaling.originalMaxPosition;
      const attnFactor =
        scaling.attnFactor ?? (scale <= 1 ? 1 : Math.sqrt(1 + Math.log(scale) / Math.log(scaling.originalMaxPosition)));
      return { invFreq: base.map((f, i) => f / factors[i]), attnFactor };
    }
    case "llama3":
      return { invFreq: llama3(base, scaling), attnFactor: 1 };
    case "yarn":
      return yarn(theta, headDim, scaling);
  }
}

function llama3(base: Float64Array, s: Extract<RopeScaling, { type: "llama3" }>): Float64Array {
  const lowWavelen = s.originalMaxPosition / s.lowFreqFactor;
  const highWavelen = s.originalMaxPosition / s.highFreqFactor;
  return base.map((f) => {
    const wavelen = (2 * Math.PI) / f;
    if (wavelen < highWavelen) return f;
    if (wavelen > lowWavelen) return f / s.factor;
    const smooth = (s.originalMaxPosition / wavelen - s.lowFreqFactor) / (s.highFreqFactor - s.lowFreqFactor);
    return (1 - smooth) * (f / s.factor) + smooth * f;
  });
}

function yarn(
  theta: number,
  headDim: number,
  s: Extract<RopeScaling, { type: "yarn" }>,
): { invFreq: Float64Array; attnFactor: number } {
  // The pair index where a frequency turns `rotations` times over the original context.
  const pairAt = (rotations: number) =>
    (headDim * Math.log(s.originalMaxPosition / (rotations * 2 * Math.PI))) / (2 * Math.log(theta));
  let low = pairAt(s.betaFast);
  let high = pairAt(s.betaSlow);
  if (s.truncate) [low, high] = [Math.floor(low), Math.ceil(high)];
  [low, high] = [Math.max(low, 0), Math.min(high, headDim - 1)];
  if (low === high) high += 0.001;
  const invFreq = baseFrequencies(theta, headDim).map((f, i) => {
    // 1 where the pair keeps its own frequency (high frequencies), 0 where it is interpolated.
    const extrapolate = 1 - Math.min(1, Math.max(0, (i - low) / (high - low)));
    return (f / s.factor) * (1 - extrapolate) + f * extrapolate;
  });
  const attnFactor = s.attnFactor ?? (s.factor <= 1 ? 1 : 0.1 * Math.log(s.factor) + 1);
  return { invFreq, attnFactor };
}

/** The longest context a scaling serves, from the model's own (vLLM's rule). */
export function scaledMaxPosition(maxPosition: number, scaling: RopeScaling | null): number {
  if (scaling === null) return maxPosition;
  switch (scaling.type) {
    case "linear":
      return Math.round(maxPosition * scaling.factor);
    case "dynamic":
      return Math.round(scaling.originalMaxPosition * scaling.factor);
    case "yarn":
      return Math.max(maxPosition, Math.round(scaling.originalMaxPosition * scaling.factor));
    default:
      return maxPosition;
  }
}

const num = (v: unknown, fallback?: number): number | undefined => (typeof v === "number" ? v : fallback);

/** config.json's `rope_scaling` (null or `default`: none), or one line naming what is not supported. */
export function ropeScalingFromHf(
  raw: unknown,
  maxPosition: number,
  where: string,
  topLevelOriginal?: unknown, // Phi-3 keeps original_max_position_embeddings beside rope_scaling
): RopeScaling | null {
  if (raw === null || raw === undefined) return null;
  const r = raw as Record<string, unknown>;
  const type = r.rope_type ?? r.type;
  if (type === "default") return null;
  const factor = num(r.factor);
  const need = (v: number | undefined, key: string): number => {
    if (v === undefined || !(v > 0)) throw new ModelLoadError(`${where}: rope_scaling ${String(type)} needs ${key}`);
    return v;
  };
  const original = num(r.original_max_position_embeddings) ?? num(topLevelOriginal) ?? maxPosition;
  switch (type) {
    case "linear":
      return { type, factor: need(factor, "factor") };
    case "dynamic":
      return { type, factor: need(factor, "factor"), originalMaxPosition: original };
    case "llama3":
      return {
        type,
        factor: need(factor, "factor"),
        lowFreqFactor: need(num(r.low_freq_factor), "low_freq_factor"),
        highFreqFactor: need(num(r.high_freq_factor), "high_freq_factor"),
        originalMaxPosition: need(num(r.original_max_position_embeddings), "original_max_position_embeddings"),
      };
    case "longrope":
    case "su": {
      const factors = (k: string) => {
        const v = r[k];
        if (!Array.isArray(v) || !v.every((x) => typeof x === "number" && x > 0))
          throw new ModelLoadError(`${where}: rope_scaling ${String(type)} needs ${k}`);
        return Float64Array.from(v as number[]);
      };
      return {
        type: "longrope",
        long: factors("long_factor"),
        short: factors("short_factor"),
        originalMaxPosition: original,
        maxPosition,
        attnFactor: num(r.attention_factor) ?? null,
      };
    }
    case "yarn": {
      const mscale = num(r.mscale);
      const mscaleAllDim = num(r.mscale_all_dim);
      const f = need(factor, "factor");
      const m = (scale: number, k: number) => (scale <= 1 ? 1 : 0.1 * k * Math.log(scale) + 1);
      const attnFactor = num(r.attention_factor) ?? (mscale && mscaleAllDim ? m(f, mscale) / m(f, mscaleAllDim) : null);
      return {
        type,
        factor: f,
        originalMaxPosition: original,
        betaFast: num(r.beta_fast, 32)!,
        betaSlow: num(r.beta_slow, 1)!,
        attnFactor,
        truncate: r.truncate !== false,
      };
    }
    default:
      throw new ModelLoadError(
        `${where}: rope_scaling ${JSON.stringify(raw)} is not supported (supported: ${SUPPORTED_ROPE_SCALING})`,
      );
  }
}
