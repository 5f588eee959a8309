// A plain reference forward pass in f64, HF layout, one token at a time with a
// dense KV cache: the simplest correct Llama, for checking the engine.
import { fromF16Bits, toF16Bits } from "../../src/model/f16.ts";
import type { RandomLlamaShape, RefTensor } from "./random_llama.ts";

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

  /** q8Activations: every matmul's input goes through quantizeActivations first (quantized weights with integer products). */
  constructor(
    private readonly s: RandomLlamaShape,
    weights: RefTensor[],
    private readonly q8Activations = false,
  ) {
    for (const t of weights) this.w.set(t.name, t.data);
    this.hd = s.dim / s.heads;
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
        const freq = 1 / this.s.ropeTheta ** ((2 * i) / hd);
        const c = Math.cos(pos * freq);
        const s = Math.sin(pos * freq);
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
      const q = this.matvec(this.get(`${p}.self_attn.q_proj.weight`), xb, s.heads * hd);
      const k = this.matvec(this.get(`${p}.self_attn.k_proj.weight`), xb, s.kvHeads * hd);
      const v = this.matvec(this.get(`${p}.self_attn.v_proj.weight`), xb, s.kvHeads * hd);
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
