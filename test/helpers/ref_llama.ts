// A plain reference forward pass in f64, HF layout, one token at a time with a
// dense KV cache: the simplest correct Llama, for checking the engine.
import { fromF16Bits, toF16Bits } from "../../src/model/f16.ts";
import { headDimOf, type RandomLlamaShape, type RefTensor } from "./random_llama.ts";

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
    for (let i = b; i < b + 32; i++) out[i] = stored * Math.round(Math.fround(Math.fround(x[i]) * inv));
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
    return x.map((v, i) => v * scale * w[i]);
  }

  private rope(v: Float64Array, heads: number, pos: number): void {
    const hd = this.hd;
    for (let h = 0; h < heads; h++)
      for (let i = 0; i < hd / 2; i++) {
        const freq = this.rot.invFreq[i];
        const c = Math.cos(pos * freq) * this.rot.attnFactor;
        const s = Math.sin(pos * freq) * this.rot.attnFactor;
        const a = h * hd + i;
        const b = a + hd / 2;
        const x0 = v[a];
        const x1 = v[b];
        v[a] = x0 * c - x1 * s;
        v[b] = x0 * s + x1 * c;
      }
  }

  /** Feeds one token at the next position; returns the logits for the token after it. */
  forward(token: number): Float64Array {
    const s = this.s;
    const hd = this.hd;
    const pos = this.kCache[0].length;
    let x = this.get("model.embed_tokens.weight").slice(token * s.dim, (token + 1) * s.dim);
    for (let l = 0; l < s.layers; l++) {
      const p = `model.layers.${l}`;
      const xb = this.rmsnorm(x, this.get(`${p}.input_layernorm.weight`));
      const a = `${p}.self_attn`;
      const q = this.shapeHeads(
        this.matvec(this.get(`${a}.q_proj.weight`), xb, s.heads * hd),
        s.heads,
        `${a}.q_proj.bias`,
        `${a}.q_norm.weight`,
      );
      const k = this.shapeHeads(
        this.matvec(this.get(`${a}.k_proj.weight`), xb, s.kvHeads * hd),
        s.kvHeads,
        `${a}.k_proj.bias`,
        `${a}.k_norm.weight`,
      );
      const v = this.shapeHeads(
        this.matvec(this.get(`${a}.v_proj.weight`), xb, s.kvHeads * hd),
        s.kvHeads,
        `${a}.v_proj.bias`,
        "",
      );
      this.rope(q, s.heads, pos);
      this.rope(k, s.kvHeads, pos);
      this.kCache[l].push(k);
      this.vCache[l].push(v);
      const att = new Float64Array(s.heads * hd);
      const group = s.heads / s.kvHeads;
      for (let h = 0; h < s.heads; h++) {
        const kvh = Math.floor(h / group);
        const scores = this.kCache[l].map((kp) => {
          let d = 0;
          for (let i = 0; i < hd; i++) d += q[h * hd + i] * kp[kvh * hd + i];
          return d / Math.sqrt(hd);
        });
        const max = Math.max(...scores);
        const e = scores.map((sc) => Math.exp(sc - max));
        const sum = e.reduce((a, b) => a + b, 0);
        this.vCache[l].forEach((vp, t) => {
          for (let i = 0; i < hd; i++) att[h * hd + i] += (e[t] / sum) * vp[kvh * hd + i];
        });
      }
      const o = this.matvec(this.get(`${p}.self_attn.o_proj.weight`), att, s.dim);
      x = x.map((v0, i) => v0 + o[i]);
      const xb2 = this.rmsnorm(x, this.get(`${p}.post_attention_layernorm.weight`));
      const gate = this.matvec(this.get(`${p}.mlp.gate_proj.weight`), xb2, s.ffn);
      const up = this.matvec(this.get(`${p}.mlp.up_proj.weight`), xb2, s.ffn);
      const hidden = gate.map((g, i) => (g / (1 + Math.exp(-g))) * up[i]);
      const down = this.matvec(this.get(`${p}.mlp.down_proj.weight`), hidden, s.dim);
      x = x.map((v0, i) => v0 + down[i]);
    }
    const xf = this.rmsnorm(x, this.get("model.norm.weight"));
    return this.matvec(this.get(s.tied ? "model.embed_tokens.weight" : "lm_head.weight"), xf, s.vocab);
  }
}

export function argmaxAndGap(logits: ArrayLike<number>): { id: number; gap: number } {
  let best = 0;
  for (let i = 1; i < logits.length; i++) if (logits[i] > logits[best]) best = i;
  let second = -Infinity;
  for (let i = 0; i < logits.length; i++) if (i !== best && logits[i] > second) second = logits[i];
  return { id: best, gap: logits[best] - second };
}
