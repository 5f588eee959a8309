// GGUF block quantizers and their decoders. `inferneo quantize` writes quantized GGUF
// files with them; tests use them to write quantized random models and to give the
// reference forward pass the exact weights the engine sees. Layouts are ggml's (see
// engine/src/quant.zig for the bit maps); the quantizers are simple round-to-nearest
// ones, not llama.cpp's error-minimizing search.
import { fromF16Bits, toF16Bits } from "./f16.ts";

export type QuantType = "q8_0" | "q4_0" | "q4_1" | "q5_1" | "q4_k" | "q5_k" | "q6_k" | "q5_0" | "q3_k" | "iq4_nl";
export const GGML_TYPE_ID: Record<QuantType, number> = {
  q8_0: 8,
  q4_0: 2,
  q4_1: 3,
  q5_1: 7,
  q4_k: 12,
  q5_k: 13,
  q6_k: 14,
  q5_0: 6,
  q3_k: 11,
  iq4_nl: 20,
};
export const BLOCK: Record<QuantType, { elems: number; bytes: number }> = {
  q8_0: { elems: 32, bytes: 34 },
  q4_0: { elems: 32, bytes: 18 },
  q4_1: { elems: 32, bytes: 20 },
  q5_1: { elems: 32, bytes: 24 },
  q4_k: { elems: 256, bytes: 144 },
  q5_k: { elems: 256, bytes: 176 },
  q6_k: { elems: 256, bytes: 210 },
  q5_0: { elems: 32, bytes: 22 },
  q3_k: { elems: 256, bytes: 110 },
  iq4_nl: { elems: 32, bytes: 18 },
};
const KVALUES_IQ4NL = [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113];

const f16 = (v: number) => fromF16Bits(toF16Bits(v));
const clamp = (v: number, lo: number, hi: number) => Math.max(lo, Math.min(hi, v));

function q8_0(x: ArrayLike<number>, o: number, out: DataView, at: number): void {
  let amax = 0;
  for (let j = 0; j < 32; j++) amax = Math.max(amax, Math.abs(x[o + j]));
  const d = f16(amax / 127);
  out.setUint16(at, toF16Bits(d), true);
  for (let j = 0; j < 32; j++) out.setInt8(at + 2 + j, d === 0 ? 0 : clamp(Math.round(x[o + j] / d), -127, 127));
}

function q4_0(x: ArrayLike<number>, o: number, out: DataView, at: number): void {
  let max = 0;
  for (let j = 0; j < 32; j++) if (Math.abs(x[o + j]) > Math.abs(max)) max = x[o + j];
  const d = f16(max / -8);
  out.setUint16(at, toF16Bits(d), true);
  const q = (v: number) => (d === 0 ? 8 : clamp(Math.round(v / d) + 8, 0, 15));
  for (let j = 0; j < 16; j++) out.setUint8(at + 2 + j, q(x[o + j]) | (q(x[o + j + 16]) << 4));
}

/** Q4_1 and Q5_1: 32 weights = d * q + m, q 4 (5) bits; Q5_1's fifth bits in qh, as Q5_0's. */
function q_1(bits: 4 | 5, x: ArrayLike<number>, o: number, out: DataView, at: number): void {
  let lo = Infinity;
  let hi = -Infinity;
  for (let j = 0; j < 32; j++) {
    lo = Math.min(lo, x[o + j]);
    hi = Math.max(hi, x[o + j]);
  }
  const top = (1 << bits) - 1;
  const d = f16((hi - lo) / top);
  const m = f16(lo);
  out.setUint16(at, toF16Bits(d), true);
  out.setUint16(at + 2, toF16Bits(m), true);
  const q = (v: number) => (d === 0 ? 0 : clamp(Math.round((v - m) / d), 0, top));
  const qs = at + (bits === 5 ? 8 : 4);
  let qh = 0;
  for (let j = 0; j < 16; j++) {
    const [a, b] = [q(x[o + j]), q(x[o + j + 16])];
    out.setUint8(qs + j, (a & 0xf) | ((b & 0xf) << 4));
    qh |= ((a >> 4) << j) | ((b >> 4) << (j + 16));
  }
  if (bits === 5) out.setUint32(at + 4, qh >>> 0, true);
}

const q4_1 = (x: ArrayLike<number>, o: number, out: DataView, at: number) => q_1(4, x, o, out, at);
const q5_1 = (x: ArrayLike<number>, o: number, out: DataView, at: number) => q_1(5, x, o, out, at);

/** Q4_K (4-bit q) and Q5_K (5-bit: Q4_K's nibbles, each with a bit of qh on top): 8 sub-blocks of 32, 6-bit scales and mins. */
function kQuant(bits: 4 | 5, x: ArrayLike<number>, o: number, out: DataView, at: number): void {
  const top = (1 << bits) - 1;
  const scale: number[] = [];
  const mval: number[] = [];
  for (let s = 0; s < 8; s++) {
    let lo = 0;
    let hi = -Infinity;
    for (let j = 0; j < 32; j++) {
      lo = Math.min(lo, x[o + 32 * s + j]);
      hi = Math.max(hi, x[o + 32 * s + j]);
    }
    scale.push(Math.max(hi - lo, 1e-8) / top);
    mval.push(-lo);
  }
  const d = f16(Math.max(...scale) / 63);
  const dmin = f16(Math.max(...mval) / 63);
  const sc = scale.map((v) => (d === 0 ? 0 : clamp(Math.round(v / d), 1, 63)));
  const mn = mval.map((v) => (dmin === 0 ? 0 : clamp(Math.round(v / dmin), 0, 63)));
  out.setUint16(at, toF16Bits(d), true);
  out.setUint16(at + 2, toF16Bits(dmin), true);
  for (let j = 0; j < 4; j++) {
    out.setUint8(at + 4 + j, sc[j] | ((sc[j + 4] >> 4) << 6));
    out.setUint8(at + 8 + j, mn[j] | ((mn[j + 4] >> 4) << 6));
    out.setUint8(at + 12 + j, (sc[j + 4] & 0xf) | ((mn[j + 4] & 0xf) << 4));
  }
  const q = (s: number, v: number) => clamp(Math.round((v + dmin * mn[s]) / (d * sc[s])), 0, top);
  const qs = at + (bits === 5 ? 48 : 16);
  if (bits === 5) for (let l = 0; l < 32; l++) out.setUint8(at + 16 + l, 0);
  for (let g = 0; g < 4; g++)
    for (let l = 0; l < 32; l++) {
      const [a, b] = [q(2 * g, x[o + 64 * g + l]), q(2 * g + 1, x[o + 64 * g + 32 + l])];
      out.setUint8(qs + 32 * g + l, (a & 0xf) | ((b & 0xf) << 4));
      if (bits === 5)
        out.setUint8(at + 16 + l, out.getUint8(at + 16 + l) | ((a >> 4) << (2 * g)) | ((b >> 4) << (2 * g + 1)));
    }
}

const q4_k = (x: ArrayLike<number>, o: number, out: DataView, at: number) => kQuant(4, x, o, out, at);
const q5_k = (x: ArrayLike<number>, o: number, out: DataView, at: number) => kQuant(5, x, o, out, at);

function q6_k(x: ArrayLike<number>, o: number, out: DataView, at: number): void {
  const groupScale: number[] = [];
  for (let g = 0; g < 16; g++) {
    let amax = 0;
    for (let j = 0; j < 16; j++) amax = Math.max(amax, Math.abs(x[o + 16 * g + j]));
    groupScale.push(amax / 31);
  }
  const d = f16(Math.max(...groupScale) / 127);
  const sc = groupScale.map((v) => (d === 0 ? 0 : clamp(Math.round(v / d), -128, 127)));
  // Element e: half h, quarter k, lane l; its group is 8h + (l >> 4) + 2k.
  const q = new Array<number>(256);
  for (let e = 0; e < 256; e++) {
    const h = e >> 7;
    const k = (e & 127) >> 5;
    const l = e & 31;
    const s = d * sc[8 * h + (l >> 4) + 2 * k];
    q[e] = s === 0 ? 32 : clamp(Math.round(x[o + e] / s), -32, 31) + 32;
  }
  for (let h = 0; h < 2; h++)
    for (let l = 0; l < 32; l++) {
      const [a, b, c, dd] = [0, 1, 2, 3].map((k) => q[128 * h + 32 * k + l]);
      out.setUint8(at + 64 * h + l, (a & 0xf) | ((c & 0xf) << 4));
      out.setUint8(at + 64 * h + l + 32, (b & 0xf) | ((dd & 0xf) << 4));
      out.setUint8(at + 128 + 32 * h + l, (a >> 4) | ((b >> 4) << 2) | ((c >> 4) << 4) | ((dd >> 4) << 6));
    }
  for (let g = 0; g < 16; g++) out.setInt8(at + 192 + g, sc[g]);
  out.setUint16(at + 208, toF16Bits(d), true);
}

function q5_0(x: ArrayLike<number>, o: number, out: DataView, at: number): void {
  let max = 0;
  for (let j = 0; j < 32; j++) if (Math.abs(x[o + j]) > Math.abs(max)) max = x[o + j];
  const d = f16(max / -16);
  out.setUint16(at, toF16Bits(d), true);
  const q = (v: number) => (d === 0 ? 16 : clamp(Math.round(v / d) + 16, 0, 31));
  let qh = 0;
  for (let j = 0; j < 16; j++) {
    const [a, b] = [q(x[o + j]), q(x[o + j + 16])];
    out.setUint8(at + 6 + j, (a & 0xf) | ((b & 0xf) << 4));
    qh |= ((a >> 4) << j) | ((b >> 4) << (j + 16));
  }
  out.setUint32(at + 2, qh >>> 0, true);
}

function iq4_nl(x: ArrayLike<number>, o: number, out: DataView, at: number): void {
  let max = 0;
  for (let j = 0; j < 32; j++) if (Math.abs(x[o + j]) > Math.abs(max)) max = x[o + j];
  const d = f16(max / KVALUES_IQ4NL[0]);
  out.setUint16(at, toF16Bits(d), true);
  const q = (v: number) => {
    let best = 0;
    for (let i = 1; i < 16; i++)
      if (Math.abs(d * KVALUES_IQ4NL[i] - v) < Math.abs(d * KVALUES_IQ4NL[best] - v)) best = i;
    return best;
  };
  for (let j = 0; j < 16; j++) out.setUint8(at + 2 + j, q(x[o + j]) | (q(x[o + j + 16]) << 4));
}

/** Q3_K's element e: its group of 16 (the scale's index), qs byte and shift, hmask byte and bit. */
function q3kPlace(e: number) {
  const [n, j, l32] = [e >> 7, (e & 127) >> 5, e & 31];
  return { group: 8 * n + 2 * j + (l32 >> 4), qs: 32 * n + l32, shift: 2 * j, hm: l32, bit: 4 * n + j };
}

function q3_k(x: ArrayLike<number>, o: number, out: DataView, at: number): void {
  const groupScale: number[] = [];
  for (let g = 0; g < 16; g++) {
    let max = 0;
    for (let e = 0; e < 256; e++) {
      const v = x[o + e];
      if (q3kPlace(e).group === g && Math.abs(v) > Math.abs(max)) max = v;
    }
    groupScale.push(max / -4);
  }
  const d = f16(Math.max(...groupScale.map(Math.abs)) / 31);
  const sc = groupScale.map((v) => (d === 0 ? 32 : clamp(Math.round(v / d), -32, 31) + 32));
  for (let i = 0; i < 110; i++) out.setUint8(at + i, 0);
  for (let e = 0; e < 256; e++) {
    const p = q3kPlace(e);
    const s = d * (sc[p.group] - 32);
    const q = s === 0 ? 4 : clamp(Math.round(x[o + e] / s), -4, 3) + 4;
    out.setUint8(at + 32 + p.qs, out.getUint8(at + 32 + p.qs) | ((q & 3) << p.shift));
    out.setUint8(at + p.hm, out.getUint8(at + p.hm) | ((q >> 2) << p.bit));
  }
  for (let i = 0; i < 16; i++) {
    const byte = i < 8 ? i : i - 8;
    out.setUint8(at + 96 + byte, out.getUint8(at + 96 + byte) | ((sc[i] & 0xf) << (i < 8 ? 0 : 4)));
    out.setUint8(at + 104 + (i % 4), out.getUint8(at + 104 + (i % 4)) | ((sc[i] >> 4) << (2 * (i >> 2))));
  }
  out.setUint16(at + 108, toF16Bits(d), true);
}

const QUANTIZE = { q8_0, q4_0, q4_1, q5_1, q4_k, q5_k, q6_k, q5_0, q3_k, iq4_nl };

/** Quantizes a row-major matrix whose rows are a whole number of blocks. */
export function quantize(type: QuantType, data: ArrayLike<number>, cols: number): Uint8Array {
  const { elems, bytes } = BLOCK[type];
  if (cols % elems !== 0) throw new Error(`${type} needs rows of a multiple of ${elems} weights, not ${cols}`);
  const blocks = data.length / elems;
  const buf = new Uint8Array(blocks * bytes);
  const view = new DataView(buf.buffer);
  for (let b = 0; b < blocks; b++) QUANTIZE[type](data, b * elems, view, b * bytes);
  return buf;
}

/** Decodes blocks back to weights, element by element, from ggml's definitions. */
export function dequantize(type: QuantType, buf: Uint8Array): Float64Array {
  const { elems, bytes } = BLOCK[type];
  const view = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  const blocks = buf.byteLength / bytes;
  const y = new Float64Array(blocks * elems);
  for (let b = 0; b < blocks; b++) {
    const at = b * bytes;
    const o = b * elems;
    if (type === "q8_0") {
      const d = fromF16Bits(view.getUint16(at, true));
      for (let j = 0; j < 32; j++) y[o + j] = d * view.getInt8(at + 2 + j);
    } else if (type === "q4_0") {
      const d = fromF16Bits(view.getUint16(at, true));
      for (let j = 0; j < 16; j++) {
        const byte = view.getUint8(at + 2 + j);
        y[o + j] = d * ((byte & 0xf) - 8);
        y[o + j + 16] = d * ((byte >> 4) - 8);
      }
    } else if (type === "q4_1" || type === "q5_1") {
      const d = fromF16Bits(view.getUint16(at, true));
      const m = fromF16Bits(view.getUint16(at + 2, true));
      const five = type === "q5_1";
      const qh = five ? view.getUint32(at + 4, true) : 0;
      for (let j = 0; j < 16; j++) {
        const byte = view.getUint8(at + (five ? 8 : 4) + j);
        y[o + j] = d * ((byte & 0xf) | (((qh >>> j) & 1) << 4)) + m;
        y[o + j + 16] = d * ((byte >> 4) | (((qh >>> (j + 16)) & 1) << 4)) + m;
      }
    } else if (type === "q4_k" || type === "q5_k") {
      const d = fromF16Bits(view.getUint16(at, true));
      const dmin = fromF16Bits(view.getUint16(at + 2, true));
      const s = (i: number) => view.getUint8(at + 4 + i);
      const scaleMin = (j: number) =>
        j < 4
          ? [s(j) & 63, s(j + 4) & 63]
          : [(s(j + 4) & 0xf) | ((s(j - 4) >> 6) << 4), (s(j + 4) >> 4) | ((s(j) >> 6) << 4)];
      // Q5_K: qh[l] bit 2g (bit 2g + 1) is the fifth bit of the low (high) nibble of group g's byte l.
      const five = type === "q5_k";
      const fifth = (l: number, bit: number) => (five ? ((view.getUint8(at + 16 + l) >> bit) & 1) << 4 : 0);
      for (let g = 0; g < 4; g++) {
        const [sc1, m1] = scaleMin(2 * g);
        const [sc2, m2] = scaleMin(2 * g + 1);
        for (let l = 0; l < 32; l++) {
          const byte = view.getUint8(at + (five ? 48 : 16) + 32 * g + l);
          y[o + 64 * g + l] = d * sc1 * ((byte & 0xf) | fifth(l, 2 * g)) - dmin * m1;
          y[o + 64 * g + 32 + l] = d * sc2 * ((byte >> 4) | fifth(l, 2 * g + 1)) - dmin * m2;
        }
      }
    } else if (type === "q5_0") {
      const d = fromF16Bits(view.getUint16(at, true));
      const qh = view.getUint32(at + 2, true);
      for (let j = 0; j < 16; j++) {
        const byte = view.getUint8(at + 6 + j);
        y[o + j] = d * (((byte & 0xf) | (((qh >> j) & 1) << 4)) - 16);
        y[o + j + 16] = d * (((byte >> 4) | (((qh >> (j + 16)) & 1) << 4)) - 16);
      }
    } else if (type === "iq4_nl") {
      const d = fromF16Bits(view.getUint16(at, true));
      for (let j = 0; j < 16; j++) {
        const byte = view.getUint8(at + 2 + j);
        y[o + j] = d * KVALUES_IQ4NL[byte & 0xf];
        y[o + j + 16] = d * KVALUES_IQ4NL[byte >> 4];
      }
    } else if (type === "q3_k") {
      const d = fromF16Bits(view.getUint16(at + 108, true));
      const b = (i: number) => view.getUint8(at + 96 + i);
      const scale = (i: number) =>
        ((i < 8 ? b(i) & 0xf : b(i - 8) >> 4) | (((b(8 + (i % 4)) >> (2 * (i >> 2))) & 3) << 4)) - 32;
      for (let e = 0; e < 256; e++) {
        const p = q3kPlace(e);
        const q = ((view.getUint8(at + 32 + p.qs) >> p.shift) & 3) | (((view.getUint8(at + p.hm) >> p.bit) & 1) << 2);
        y[o + e] = d * scale(p.group) * (q - 4);
      }
    } else {
      const d = fromF16Bits(view.getUint16(at + 208, true));
      for (let h = 0; h < 2; h++)
        for (let l = 0; l < 32; l++) {
          const ql0 = view.getUint8(at + 64 * h + l);
          const ql1 = view.getUint8(at + 64 * h + l + 32);
          const qh = view.getUint8(at + 128 + 32 * h + l);
          const sc = (i: number) => view.getInt8(at + 192 + 8 * h + (l >> 4) + i);
          y[o + 128 * h + l] = d * sc(0) * (((ql0 & 0xf) | ((qh & 3) << 4)) - 32);
          y[o + 128 * h + l + 32] = d * sc(2) * (((ql1 & 0xf) | (((qh >> 2) & 3) << 4)) - 32);
          y[o + 128 * h + l + 64] = d * sc(4) * (((ql0 >> 4) | (((qh >> 4) & 3) << 4)) - 32);
          y[o + 128 * h + l + 96] = d * sc(6) * (((ql1 >> 4) | (((qh >> 6) & 3) << 4)) - 32);
        }
    }
  }
  return y;
}
