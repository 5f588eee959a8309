// Reads a GGUF file's metadata and tensor table (versions 2 and 3).
// The tensor data itself is never read here: the engine maps the file.
import { closeSync, fstatSync, openSync, readSync } from "node:fs";
import { basename } from "node:path";
import { ModelLoadError } from "./errors.ts";

export type GgufValue = number | bigint | boolean | string | GgufValue[];

export interface GgufTensorInfo {
  name: string;
  dims: number[]; // GGML order: dims[0] is the contiguous (inner) dimension
  type: number; // GGML type id
  offset: number; // absolute byte offset in the file
  sizeBytes: number;
}

export interface GgufFile {
  path: string;
  version: number;
  metadata: Map<string, GgufValue>;
  kvRange: [number, number]; // bytes of the metadata key/value section, as stored
  alignment: number;
  tensors: GgufTensorInfo[];
  fileBytes: number;
}

/** GGML type ids with their block geometry: [elements per block, bytes per block]. */
export const GGML_TYPES: Record<number, { name: string; blockElems: number; blockBytes: number }> = {
  0: { name: "F32", blockElems: 1, blockBytes: 4 },
  1: { name: "F16", blockElems: 1, blockBytes: 2 },
  2: { name: "Q4_0", blockElems: 32, blockBytes: 18 },
  3: { name: "Q4_1", blockElems: 32, blockBytes: 20 },
  6: { name: "Q5_0", blockElems: 32, blockBytes: 22 },
  7: { name: "Q5_1", blockElems: 32, blockBytes: 24 },
  8: { name: "Q8_0", blockElems: 32, blockBytes: 34 },
  10: { name: "Q2_K", blockElems: 256, blockBytes: 84 },
  11: { name: "Q3_K", blockElems: 256, blockBytes: 110 },
  12: { name: "Q4_K", blockElems: 256, blockBytes: 144 },
  13: { name: "Q5_K", blockElems: 256, blockBytes: 176 },
  14: { name: "Q6_K", blockElems: 256, blockBytes: 210 },
  20: { name: "IQ4_NL", blockElems: 32, blockBytes: 18 },
  23: { name: "IQ4_XS", blockElems: 256, blockBytes: 136 },
  30: { name: "BF16", blockElems: 1, blockBytes: 2 },
};

class NeedMore extends Error {}

class Reader {
  pos = 0;
  private readonly view: DataView;
  private readonly decoder = new TextDecoder("utf-8", { fatal: false });
  constructor(private readonly buf: Uint8Array) {
    this.view = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  }
  private need(n: number): void {
    if (this.pos + n > this.buf.byteLength) throw new NeedMore();
  }
  u8() {
    this.need(1);
    return this.view.getUint8(this.pos++);
  }
  u32() {
    this.need(4);
    const v = this.view.getUint32(this.pos, true);
    this.pos += 4;
    return v;
  }
  u64(): number {
    this.need(8);
    const v = this.view.getBigUint64(this.pos, true);
    this.pos += 8;
    if (v > BigInt(Number.MAX_SAFE_INTEGER))
      throw new ModelLoadError(`value ${v} at byte ${this.pos - 8} is out of range`);
    return Number(v);
  }
  str(): string {
    const n = this.u64();
    if (n > 1 << 24) throw new ModelLoadError(`string of ${n} bytes at byte ${this.pos - 8}: the file is corrupt`);
    this.need(n);
    const s = this.decoder.decode(this.buf.subarray(this.pos, this.pos + n));
    this.pos += n;
    return s;
  }
  value(type: number): GgufValue {
    switch (type) {
      case 0:
        return this.u8();
      case 1: {
        this.need(1);
        return this.view.getInt8(this.pos++);
      }
      case 2: {
        this.need(2);
        const v = this.view.getUint16(this.pos, true);
        this.pos += 2;
        return v;
      }
      case 3: {
        this.need(2);
        const v = this.view.getInt16(this.pos, true);
        this.pos += 2;
        return v;
      }
      case 4:
        return this.u32();
      case 5: {
        this.need(4);
        const v = this.view.getInt32(this.pos, true);
        this.pos += 4;
        return v;
      }
      case 6: {
        this.need(4);
        const v = this.view.getFloat32(this.pos, true);
        this.pos += 4;
        return v;
      }
      case 7:
        return this.u8() !== 0;
      case 8:
        return this.str();
      case 9: {
        const itemType = this.u32();
        const count = this.u64();
        if (count > 1 << 26) throw new ModelLoadError(`array of ${count} items: the file is corrupt`);
        const items: GgufValue[] = new Array(count);
        for (let i = 0; i < count; i++) items[i] = this.value(itemType);
        return items;
      }
      case 10: {
        this.need(8);
        const v = this.view.getBigUint64(this.pos, true);
        this.pos += 8;
        return v <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(v) : v;
      }
      case 11: {
        this.need(8);
        const v = this.view.getBigInt64(this.pos, true);
        this.pos += 8;
        return v;
      }
      case 12: {
        this.need(8);
        const v = this.view.getFloat64(this.pos, true);
        this.pos += 8;
        return v;
      }
      default:
        throw new ModelLoadError(`unknown GGUF value type ${type}: the file is corrupt or newer than this reader`);
    }
  }
}

/** Bytes of a tensor of `type` with `elements` elements, or null for types this reader does not know. */
export function ggmlTensorBytes(type: number, elements: number): number | null {
  const t = GGML_TYPES[type];
  if (!t) return null;
  return (elements / t.blockElems) * t.blockBytes;
}

/** The bytes of one tensor of a GGUF file (for the few the loader reads itself, and for tests). */
export function readTensorBytes(path: string, t: GgufTensorInfo): Uint8Array {
  const bytes = new Uint8Array(t.sizeBytes);
  const fd = openSync(path, "r");
  try {
    readSync(fd, bytes, 0, bytes.length, t.offset);
  } finally {
    closeSync(fd);
  }
  return bytes;
}

export function readGguf(path: string): GgufFile {
  const fd = openSync(path, "r");
  try {
    const fileBytes = fstatSync(fd).size;
    // Metadata (a 128K vocabulary is several MB) is read with a growing window.
    let window = Math.min(fileBytes, 4 << 20);
    for (;;) {
      const buf = new Uint8Array(window);
      readSync(fd, buf, 0, window, 0);
      try {
        return parse(path, buf, fileBytes);
      } catch (e) {
        if (!(e instanceof NeedMore)) throw e;
        if (window >= fileBytes)
          throw new ModelLoadError(
            `${basename(path)}: the GGUF header runs past the end of the file (${fileBytes} bytes): truncated`,
          );
        window = Math.min(fileBytes, window * 4);
      }
    }
  } finally {
    closeSync(fd);
  }
}

function parse(path: string, buf: Uint8Array, fileBytes: number): GgufFile {
  const name = basename(path);
  const r = new Reader(buf);
  const magic = r.u32();
  if (magic !== 0x46554747) throw new ModelLoadError(`${name}: not a GGUF file (bad magic)`);
  const version = r.u32();
  if (version !== 2 && version !== 3)
    throw new ModelLoadError(`${name}: GGUF version ${version} is not supported (2 and 3 are)`);
  const tensorCount = r.u64();
  const kvCount = r.u64();
  if (tensorCount > 1 << 20 || kvCount > 1 << 20)
    throw new ModelLoadError(`${name}: ${tensorCount} tensors / ${kvCount} keys: the file is corrupt`);
  const metadata = new Map<string, GgufValue>();
  const kvStart = r.pos;
  for (let i = 0; i < kvCount; i++) {
    const key = r.str();
    metadata.set(key, r.value(r.u32()));
  }
  const kvEnd = r.pos;
  const infos: Omit<GgufTensorInfo, "offset" | "sizeBytes">[] = [];
  const relOffsets: number[] = [];
  for (let i = 0; i < tensorCount; i++) {
    const tensorName = r.str();
    const nDims = r.u32();
    if (nDims < 1 || nDims > 4) throw new ModelLoadError(`${name}: tensor ${tensorName} has ${nDims} dimensions`);
    const dims: number[] = [];
    for (let d = 0; d < nDims; d++) dims.push(r.u64());
    const type = r.u32();
    relOffsets.push(r.u64());
    infos.push({ name: tensorName, dims, type });
  }
  const alignment = Number(metadata.get("general.alignment") ?? 32);
  const dataStart = Math.ceil(r.pos / alignment) * alignment;
  const tensors = infos.map((info, i) => {
    const elements = info.dims.reduce((a, b) => a * b, 1);
    const bytes = ggmlTensorBytes(info.type, elements);
    const offset = dataStart + relOffsets[i];
    if (bytes !== null && offset + bytes > fileBytes) {
      throw new ModelLoadError(
        `${name}: tensor ${info.name} ends at byte ${offset + bytes} but the file has ${fileBytes}: the file is truncated`,
      );
    }
    return { ...info, offset, sizeBytes: bytes ?? -1 };
  });
  return { path, version, metadata, kvRange: [kvStart, kvEnd], alignment, tensors, fileBytes };
}
