// `inferneo quantize`: rewrites an F32/F16 GGUF with its matrices in a block-quantized
// type. Metadata is copied byte for byte; vectors (norms) and matrices whose rows are
// not whole blocks stay as they were, as llama.cpp's quantizer leaves them.
import { closeSync, openSync, readSync, writeSync } from "node:fs";
import { ModelLoadError } from "./errors.ts";
import { fromF16Bits } from "./f16.ts";
import { readGguf } from "./gguf.ts";
import { BLOCK, GGML_TYPE_ID, quantize, type QuantType } from "./quantize.ts";

export const QUANT_TYPES: readonly QuantType[] = [
  "q8_0",
  "q4_0",
  "q4_1",
  "q5_0",
  "q5_1",
  "q4_k",
  "q5_k",
  "q6_k",
  "q3_k",
  "iq4_nl",
];
/** Type mixes, as llama.cpp's llama-quantize chooses types per tensor (the types, not its scale search). */
export const QUANT_MIXES = ["q4_k_m", "q5_k_m"] as const;
export type QuantTarget = QuantType | (typeof QUANT_MIXES)[number];

// llama.cpp's use_more_bits: the first and last eighth of the layers, and every third between.
const useMoreBits = (i: number, n: number) =>
  i < Math.floor(n / 8) || i >= Math.floor((7 * n) / 8) || (i - Math.floor(n / 8)) % 3 === 2;

// llama.cpp's fallbacks for rows that are not whole 256-weight super-blocks.
const FALLBACK: Partial<Record<QuantType, QuantType>> = { q4_k: "q5_0", q5_k: "q5_1", q6_k: "q8_0", q3_k: "q4_0" };
const MIX_BASE: Record<(typeof QUANT_MIXES)[number], QuantType> = { q4_k_m: "q4_k", q5_k_m: "q5_k" };

/**
 * The type of each tensor (null: kept as it is) for a type or a mix. Q4_K_M (Q5_K_M): Q4_K
 * (Q5_K), with Q6_K for the output (or the tied embedding), and for attn_v and ffn_down in the
 * layers useMoreBits picks.
 */
function planTypes(names: string[], cols: number[], target: QuantTarget): (QuantType | null)[] {
  const count = (suffix: string) => names.filter((n) => n.endsWith(suffix)).length;
  const seen: Record<string, number> = {};
  const hasOutput = names.includes("output.weight");
  return names.map((name, i) => {
    const mix = target === "q4_k_m" || target === "q5_k_m";
    let type: QuantType = mix ? MIX_BASE[target] : target;
    if (mix) {
      if (name === "output.weight" || (!hasOutput && name === "token_embd.weight")) type = "q6_k";
      for (const suffix of ["attn_v.weight", "ffn_down.weight"])
        if (name.endsWith(suffix)) {
          const at = (seen[suffix] = (seen[suffix] ?? -1) + 1);
          if (useMoreBits(at, count(suffix))) type = "q6_k";
        }
    }
    if (cols[i] % BLOCK[type].elems !== 0) type = FALLBACK[type] ?? type;
    return cols[i] % BLOCK[type].elems === 0 ? type : null;
  });
}

function readTensor(fd: number, offset: number, bytes: number): Buffer {
  const buf = Buffer.alloc(bytes);
  readSync(fd, buf, 0, bytes, offset);
  return buf;
}

export function quantizeGguf(
  input: string,
  output: string,
  target: QuantTarget,
  progress: (done: number, total: number) => void = () => {},
): { quantized: number; kept: number } {
  const g = readGguf(input);
  const inFd = openSync(input, "r");
  const outFd = openSync(output, "w");
  try {
    const types = planTypes(
      g.tensors.map((t) => t.name),
      g.tensors.map((t) => t.dims[0]),
      target,
    );
    const plans = g.tensors.map((t, i) => {
      const cols = t.dims[0];
      const rows = t.dims.slice(1).reduce((a, b) => a * b, 1);
      const type = t.dims.length === 2 && (t.type === 0 || t.type === 1) ? types[i] : null;
      const bytes = type ? (rows * cols * BLOCK[type].bytes) / BLOCK[type].elems : t.sizeBytes;
      if (bytes < 0) throw new ModelLoadError(`${input}: tensor ${t.name} has a type this tool cannot copy`);
      return { t, cols, type, convert: type !== null, bytes, typeId: type ? GGML_TYPE_ID[type] : t.type };
    });
    const header: Buffer[] = [];
    const u32 = (v: number) => header.push(Buffer.from(new Uint32Array([v]).buffer));
    const u64 = (v: number) => header.push(Buffer.from(new BigUint64Array([BigInt(v)]).buffer));
    u32(0x46554747);
    u32(3);
    u64(g.tensors.length);
    u64(g.metadata.size);
    header.push(readTensor(inFd, g.kvRange[0], g.kvRange[1] - g.kvRange[0]));
    const pad = (n: number) => Math.ceil(n / g.alignment) * g.alignment;
    let offset = 0;
    for (const p of plans) {
      const name = Buffer.from(p.t.name, "utf8");
      u64(name.length);
      header.push(name);
      u32(p.t.dims.length);
      for (const d of p.t.dims) u64(d);
      u32(p.typeId);
      u64(offset);
      offset += pad(p.bytes);
    }
    const headerBuf = Buffer.concat(header);
    writeSync(outFd, headerBuf);
    writeSync(outFd, Buffer.alloc(pad(headerBuf.length) - headerBuf.length));
    let done = 0;
    for (const p of plans) {
      let data = readTensor(inFd, p.t.offset, p.t.sizeBytes);
      if (p.convert) {
        const n = p.t.dims[0] * p.t.dims[1];
        const values = new Float32Array(n);
        if (p.t.type === 0) values.set(new Float32Array(data.buffer, data.byteOffset, n));
        else for (let i = 0; i < n; i++) values[i] = fromF16Bits(data.readUInt16LE(2 * i));
        data = Buffer.from(quantize(p.type!, values, p.cols));
      }
      writeSync(outFd, data);
      writeSync(outFd, Buffer.alloc(pad(data.length) - data.length));
      progress(++done, plans.length);
    }
    return { quantized: plans.filter((p) => p.convert).length, kept: plans.filter((p) => !p.convert).length };
  } finally {
    closeSync(inFd);
    closeSync(outFd);
  }
}
