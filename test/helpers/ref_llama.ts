// A plain reference forward pass in f64, HF layout, one token at a time with a
// dense KV cache: the simplest correct Llama, for checking the engine.
import { fromF16Bits, toF16Bits } from "../../src/model/f16.ts";
import { headDimOf, isGemma, isLocalLayer, type RandomLlamaShape, type RefTensor } from "./random_llama.ts";

/**
 * The rotation frequencies and cos/sin factor of a shape's rope_scaling, transcribed from
 * transformers' rope initialisers (modeling_rope_utils.py: default, linear, llama3, yarn);
 * `dynamic` as vLLM fixes it at its longest context (transformers' changes with the length).
 */
export function hfRopeFrequencies(s: RandomLlamaShape): { invFreq: Float64Array; attnFactor: number } {
  const dim = headDimOf(s);
  const base = s.ropeTheta;
  const inv = (b: number) => Float64Array.from({ length: dim / 2 }, (_, i) => 1 / b ** ((2 * i) / dim));
  const r = s.ropeScaling ?? {};
  const type = (r.rope_type ?? r.type ?? "default") as string;
  const factor = r.factor as number;
  if (type === "default") return { invFreq: inv(base), attnFactor: 1 };
  if (type === "linear") return { invFreq: inv(base).map((f) => f / factor), attnFactor: 1 };
  if (type === "dynamic") {
    const maxLen = s.ctx * factor;
    const b = base * ((factor * maxLen) / s.ctx - (factor - 1)) ** (dim / (dim - 2));
    return { invFreq: inv(b), attnFactor: 1 };
  }
  if (type === "llama3") {
    const [low, high, old] = [r.low_freq_factor, r.high_freq_factor, r.original_max_position_embeddings] as number[];
    const lowWavelen = old / low;
    const highWavelen = old / high;
    const invFreq = inv(base).map((f) => {
      const wavelen = (2 * Math.PI) / f;
      const llama = wavelen > lowWavelen ? f / factor : f;
      const smooth = (old / wavelen - low) / (high - low);
      const medium = !(wavelen < highWavelen) && !(wavelen > lowWavelen);
      return medium ? ((1 - smooth) * llama) / factor + smooth * llama : llama;
    });
    return { invFreq, attnFactor: 1 };
  }
  if (type === "yarn") {
    const original = (r.original_max_position_embeddings as number | undefined) ?? s.ctx;
    const corrDim = (rot: number) => (dim * Math.log(original / (rot * 2 * Math.PI))) / (2 * Math.log(base));
    const lo = Math.max(Math.floor(corrDim((r.beta_fast as number) ?? 32)), 0);
    let hi = Math.min(Math.ceil(corrDim((r.beta_slow as number) ?? 1)), dim - 1);
    if (lo === hi) hi += 0.001;
    const invFreq = Float64Array.from({ length: dim / 2 }, (_, i) => {
      const posFreq = base ** ((2 * i) / dim);
      const extrapolationFactor = 1 - Math.min(1, Math.max(0, (i - lo) / (hi - lo)));
      return (1 / (factor * posFreq)) * (1 - extrapolationFactor) + (1 / posFreq) * extrapolationFactor;
    });
    return { invFreq, attnFactor: factor <= 1 ? 1 : 0.1 * Math.log(factor) + 1 };
  }
  if (type === "longrope") {
    // transformers' _compute_longrope_parameters, with the long factors chosen as llama.cpp chooses
    // them (a context past the original), not per sequence length.
    const original = s.originalCtx!;
    const ext = (s.ctx > original ? r.long_factor : r.short_factor) as number[];
    const scale = s.ctx / original;
    const attnFactor = scale <= 1 ? 1 : Math.sqrt(1 + Math.log(scale) / Math.log(original));
    return { invFreq: inv(base).map((f, i) => f / ext[i]), attnFactor };
  }
  throw new Error(`no reference for rope_scaling ${type}`);
}

/**
 * x as llama.cpp's Q8 activations hold it: per 32 values, q = round(x / d) with
 * d = max|x| / 127, and the value d (rounded to f16) * q.
 */
export function quantizeActivations(x: Float64Array): Float64Array {
  const out = new Float64Array(x.length);
  for (let b = 0; b < x.length; b += 32) {
    let amax = 0;
    for (let i = b; i < b + 32; i++) amax = Math.max(amax, Math.abs(Math.fround(x[i])));
    const d = Math.fround(amax / 127);
    const inv = d === 0 ? 0 : Math.fround(1 / d);
    const stored = fromF16Bits(toF16Bits(d));
    // Halves away from zero, as the engine (and C's roundf) rounds.
    for (let i = b; i < b + 32; i++) {
      const v = Math.fround(Math.fround(x[i]) * inv);
      out[i] = stored * Math.sign(v) * Math.round(Math.abs(v));
    }
  }
  return out;
}

export class RefLlama {
  private readonly w = new Map<string, Float64Array>();
  private readonly kCache: Float64Array[][] = [];
  private readonly vCache: Float64Array[][] = [];
  private readonly hd: number;
  private readonly rot: { invFreq: Float64Array; attnFactor: number };

  /** q8Activations: every matmul's input goes through quantizeActivations first (quantized weights with integer products). */
  constructor(
    private readonly s: RandomLlamaShape,
    weights: RefTensor[],
    private readonly q8Activations = false,
  ) {
    for (const t of weights) this.w.set(t.name, t.data);
    this.hd = headDimOf(s);
    this.rot = hfRopeFrequencies(s);
    for (let l = 0; l < s.layers; l++) {
      this.kCache.push([]);
      this.vCache.push([]);
    }
  }

  private get(name: string): Float64Array {
    const t = this.w.get(name);
    if (!t) throw new Error(`no tensor ${name}`);
    return t;
  }

  private matvec(w: Float64Array, input: Float64Array, rows: number): Float64Array {
    const x = this.q8Activations ? quantizeActivations(input) : input;
    const cols = x.length;
    const out = new Float64Array(rows);
    for (let r = 0; r < rows; r++) {
      let s = 0;
      for (let c = 0; c < cols; c++) s += w[r * cols + c] * x[c];
      out[r] = s;
    }
    return out;
  }

  private has(name: string): boolean {
    return this.w.has(name);
  }

  /** Adds a bias if the layer has it, then RMSNorm over each head if it has a norm (Qwen 2 / Qwen 3). */
  private shapeHeads(v: Float64Array, heads: number, bias: string, norm: string): Float64Array {
    let out = this.has(bias) ? v.map((x, i) => x + this.get(bias)[i]) : v;
    if (this.has(norm)) {
      const hd = this.hd;
      const normed = new Float64Array(out.length);
      for (let h = 0; h < heads; h++)
        normed.set(this.rmsnorm(out.subarray(h * hd, (h + 1) * hd), this.get(norm)), h * hd);
      out = normed;
    }
    return out;
  }

  private rmsnorm(x: Float64Array, w: Float64Array): Float64Array {
    let ss = 0;
    for (const v of x) ss += v * v;
    const scale = 1 / Math.sqrt(ss / x.length + 1e-5);
    // Gemma's RMSNorm scales by 1 + w (transformers' Gemma2RMSNorm / Gemma3RMSNorm).
    const offset = isGemma(this.s) ? 1 : 0;
    return x.map((v, i) => v * scale * (offset + w[i]));
  }

  /** Layer l's rotation: Gemma 3's local layers use their own base, unscaled. */
  private rotationOf(l: number): { invFreq: Float64Array; attnFactor: number } {
    const s = this.s;
    if (!s.ropeLocalTheta || !isLocalLayer(s, l)) return this.rot;
    return hfRopeFrequencies({ ...s, ropeTheta: s.ropeLocalTheta, ropeScaling: undefined });
  }

  private rope(v: Float64Array, heads: number, pos: number, rot: { invFreq: Float64Array; attnFactor: number }): void {
    const hd = this.hd;
    for (let h = 0; h < heads; h++)
      for (let i = 0; i < hd / 2; i++) {
        const freq = rot.invFreq[i];
        const c = Math.cos(pos * freq) * rot.attnFactor;
        const s = Math.sin(pos * freq) * rot.attnFactor;
        const a = h * hd + i;
        const b = a + hd / 2;
        const x0 = v[a];
        const x1 = v[b];
        v[a] = x0 * c - x1 * s;
        v[b] = x0 * s + x1 * c;
      }
  }

  /** Each query head over its KV head's cached positions (a local layer: the last slidingWindow). */
  private attend(l: number, q: Float64Array): Float64Array {
    const s = this.s;
    const hd = this.hd;
    const att = new Float64Array(s.heads * hd);
    const group = s.heads / s.kvHeads;
    const scale = 1 / Math.sqrt(s.queryPreAttnScalar ?? hd);
    const n = this.kCache[l].length;
    const first = isLocalLayer(s, l) ? Math.max(0, n - s.slidingWindow!) : 0;
    for (let h = 0; h < s.heads; h++) {
      const kvh = Math.floor(h / group);
      const scores = this.kCache[l].slice(first).map((kp) => {
        let d = 0;
        for (let i = 0; i < hd; i++) d += q[h * hd + i] * kp[kvh * hd + i];
        const score = d * scale;
        return s.attnSoftcap ? s.attnSoftcap * Math.tanh(score / s.attnSoftcap) : score;
      });
      const max = Math.max(...scores);
      const e = scores.map((sc) => Math.exp(sc - max));
      const sum = e.reduce((a, b) => a + b, 0);
      this.vCache[l].slice(first).forEach((vp, t) => {
        for (let i = 0; i < hd; i++) att[h * hd + i] += (e[t] / sum) * vp[kvh * hd + i];
      });
    }
    return att;
  }

  /** Feeds one token at the next position; returns the logits for the token after it. */
  forward(token: number): Float64Array {
    const s = this.s;
    const hd = this.hd;
    const gemma = isGemma(s);
    const pos = this.kCache[0].length;
    let x = this.get("model.embed_tokens.weight").slice(token * s.dim, (token + 1) * s.dim);
    if (gemma) x = x.map((v) => v * Math.sqrt(s.dim));
    // Gemma normalizes each sub-block's output before its residual add.
    const residual = (x0: Float64Array, d: Float64Array, norm: string) => {
      const add = gemma ? this.rmsnorm(d, this.get(norm)) : d;
      return x0.map((v0, i) => v0 + add[i]);
    };
    for (let l = 0; l < s.layers; l++) {
      const p = `model.layers.${l}`;
      const xb = this.rmsnorm(x, this.get(`${p}.input_layernorm.weight`));
      const a = `${p}.self_attn`;
      const proj = (w: string, heads: number, norm: string) =>
        this.shapeHeads(
          this.matvec(this.get(`${a}.${w}_proj.weight`), xb, heads * hd),
          heads,
          `${a}.${w}_proj.bias`,
          norm,
        );
      const q = proj("q", s.heads, `${a}.q_norm.weight`);
      const k = proj("k", s.kvHeads, `${a}.k_norm.weight`);
      const v = proj("v", s.kvHeads, "");
      const rot = this.rotationOf(l);
      this.rope(q, s.heads, pos, rot);
      this.rope(k, s.kvHeads, pos, rot);
      this.kCache[l].push(k);
      this.vCache[l].push(v);
      const o = this.matvec(this.get(`${a}.o_proj.weight`), this.attend(l, q), s.dim);
      x = residual(x, o, `${p}.post_attention_layernorm.weight`);
      const ffnNorm = gemma ? `${p}.pre_feedforward_layernorm.weight` : `${p}.post_attention_layernorm.weight`;
      const xb2 = this.rmsnorm(x, this.get(ffnNorm));
      const gate = this.matvec(this.get(`${p}.mlp.gate_proj.weight`), xb2, s.ffn);
      const up = this.matvec(this.get(`${p}.mlp.up_proj.weight`), xb2, s.ffn);
      const c = Math.sqrt(2 / Math.PI);
      const act = (g: number) =>
        gemma ? 0.5 * g * (1 + Math.tanh(c * (g + 0.044715 * g ** 3))) : g / (1 + Math.exp(-g));
      const hidden = gate.map((g, i) => act(g) * up[i]);
      const down = this.matvec(this.get(`${p}.mlp.down_proj.weight`), hidden, s.dim);
      x = residual(x, down, `${p}.post_feedforward_layernorm.weight`);
    }
    const xf = this.rmsnorm(x, this.get("model.norm.weight"));
    const logits = this.matvec(this.get(s.tied ? "model.embed_tokens.weight" : "lm_head.weight"), xf, s.vocab);
    const cap = s.finalSoftcap;
    return cap ? logits.map((v) => cap * Math.tanh(v / cap)) : logits;
  }
}

export function argmaxAndGap(logits: ArrayLike<number>): { id: number; gap: number } {
  let best = 0;
  for (let i = 1; i < logits.length; i++) if (logits[i] > logits[best]) best = i;
  let second = -Infinity;
  for (let i = 0; i < logits.length; i++) if (i !== best && logits[i] > second) second = logits[i];
  return { id: best, gap: logits[best] - second };
}
