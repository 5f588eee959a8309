// Reads safetensors headers (single file or sharded with model.safetensors.index.json).
// Only the header is read here; the engine maps the tensor bytes itself.
import { existsSync, openSync, readSync, closeSync, fstatSync, readFileSync } from "node:fs";
import { basename, join } from "node:path";
import { ModelLoadError } from "./errors.ts";

export type SafetensorsDType = "F32" | "F16" | "BF16" | string;

export interface StoredTensor {
  name: string;
  file: string;
  dtype: SafetensorsDType;
  shape: number[];
  offset: number; // absolute byte offset in `file`
  sizeBytes: number;
}

const HEADER_BYTES_MAX = 100 * 1024 * 1024;

const ELEMENT_BYTES: Record<string, number> = {
  F64: 8,
  F32: 4,
  F16: 2,
  BF16: 2,
  I64: 8,
  I32: 4,
  I16: 2,
  I8: 1,
  U8: 1,
  BOOL: 1,
  F8_E4M3: 1,
  F8_E5M2: 1,
};

export function readSafetensorsHeader(file: string): StoredTensor[] {
  const fd = openSync(file, "r");
  try {
    const fileBytes = fstatSync(fd).size;
    const name = basename(file);
    if (fileBytes < 8)
      throw new ModelLoadError(`${name}: ${fileBytes} bytes is too short for a safetensors file (truncated?)`);
    const lenBuf = Buffer.alloc(8);
    readSync(fd, lenBuf, 0, 8, 0);
    const headerBytes = Number(lenBuf.readBigUInt64LE(0));
    if (headerBytes === 0 || headerBytes > HEADER_BYTES_MAX || 8 + headerBytes > fileBytes) {
      throw new ModelLoadError(
        `${name}: header length ${headerBytes} does not fit the file (${fileBytes} bytes): truncated or not a safetensors file`,
      );
    }
    const headerBuf = Buffer.alloc(headerBytes);
    readSync(fd, headerBuf, 0, headerBytes, 8);
    let header: Record<string, unknown>;
    try {
      header = JSON.parse(headerBuf.toString("utf8")) as Record<string, unknown>;
    } catch {
      throw new ModelLoadError(`${name}: the safetensors header is not valid JSON`);
    }
    const dataStart = 8 + headerBytes;
    const tensors: StoredTensor[] = [];
    for (const [tensorName, raw] of Object.entries(header)) {
      if (tensorName === "__metadata__") continue;
      const info = raw as { dtype?: unknown; shape?: unknown; data_offsets?: unknown };
      const shape = info.shape;
      const offsets = info.data_offsets;
      if (typeof info.dtype !== "string" || !Array.isArray(shape) || !Array.isArray(offsets) || offsets.length !== 2) {
        throw new ModelLoadError(`${name}: tensor ${tensorName} has a malformed header entry`);
      }
      const [begin, end] = offsets as number[];
      const elements = (shape as number[]).reduce((a, b) => a * b, 1);
      const elemBytes = ELEMENT_BYTES[info.dtype];
      if (elemBytes !== undefined && end - begin !== elements * elemBytes) {
        throw new ModelLoadError(
          `${name}: tensor ${tensorName} spans ${end - begin} bytes but its shape [${shape.join(", ")}] of ${info.dtype} needs ${elements * elemBytes}`,
        );
      }
      if (dataStart + end > fileBytes) {
        throw new ModelLoadError(
          `${name}: tensor ${tensorName} ends at byte ${dataStart + end} but the file has ${fileBytes}: the file is truncated`,
        );
      }
      tensors.push({
        name: tensorName,
        file,
        dtype: info.dtype,
        shape: shape as number[],
        offset: dataStart + begin,
        sizeBytes: end - begin,
      });
    }
    return tensors;
  } finally {
    closeSync(fd);
  }
}

/** All tensors of an HF folder: `model.safetensors`, or the shards its index names. */
export function readSafetensorsFolder(dir: string): StoredTensor[] {
  const index = join(dir, "model.safetensors.index.json");
  if (existsSync(index)) {
    let weightMap: Record<string, string>;
    try {
      weightMap = (JSON.parse(readFileSync(index, "utf8")) as { weight_map: Record<string, string> }).weight_map;
    } catch {
      throw new ModelLoadError(`${index}: not valid JSON with a weight_map`);
    }
    const shards = [...new Set(Object.values(weightMap))];
    const tensors: StoredTensor[] = [];
    for (const shard of shards) {
      const path = join(dir, shard);
      if (!existsSync(path))
        throw new ModelLoadError(`${dir}: shard ${shard} named in model.safetensors.index.json is missing`);
      tensors.push(...readSafetensorsHeader(path));
    }
    const found = new Set(tensors.map((t) => t.name));
    const missing = Object.keys(weightMap).filter((n) => !found.has(n));
    if (missing.length > 0)
      throw new ModelLoadError(
        `${dir}: tensors listed in the index but absent from the shards: ${missing.slice(0, 3).join(", ")}`,
      );
    return tensors;
  }
  const single = join(dir, "model.safetensors");
  if (!existsSync(single)) throw new ModelLoadError(`${dir}: no model.safetensors or model.safetensors.index.json`);
  return readSafetensorsHeader(single);
}
