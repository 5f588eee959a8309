// JSON text from a grammar over tokens must still be valid UTF-8 without raw control
// characters, which xgrammar 0.1.27 does not ensure for byte tokens (a lone <0x07>, or a
// lead byte without its continuation, passed its string rule; JSON.parse then fails or a
// maxLength counts wrong). This guard tracks, per sequence, how many continuation bytes
// are owed, and gives for each such state the tokens that keep the text valid.
//
//   state k (0..3) = continuation bytes still owed by the last token's final character
import type { ModelTokenizer } from "../model/tokenizer.ts";

interface TokenShape {
  lead: number; // continuation bytes at its start
  allContinuation: boolean; // nothing but continuation bytes (or no bytes at all)
  length: number;
  open: number; // continuation bytes its last character still owes
  ok: boolean; // the rest is a valid UTF-8 prefix with no control character
}

function shapeOf(b: Uint8Array, allowControl: boolean): TokenShape {
  let i = 0;
  while (i < b.length && (b[i] & 0xc0) === 0x80) i++;
  let pending = 0;
  let ok = true;
  for (let j = i; j < b.length && ok; j++) {
    const x = b[j];
    if (pending > 0) {
      ok = (x & 0xc0) === 0x80;
      pending--;
    } else if (x < 0x80)
      ok = allowControl || x >= 0x20; // JSON strings need control characters escaped
    else if ((x & 0xe0) === 0xc0) [ok, pending] = [x >= 0xc2, 1];
    else if ((x & 0xf0) === 0xe0) pending = 2;
    else if ((x & 0xf8) === 0xf0) [ok, pending] = [x <= 0xf4, 3];
    else ok = false;
  }
  return { lead: i, allContinuation: i === b.length, length: b.length, open: pending, ok };
}

export class Utf8Guard {
  /** masks[k]: tokens allowed when k continuation bytes are owed (bit t % 32 of word t / 32). */
  readonly masks: Uint32Array[];
  private readonly shapes: TokenShape[];

  /** json: raw control characters are never valid in JSON text, so its tokens may hold none. */
  constructor(tokenizer: ModelTokenizer, vocabSize: number, specialIds: readonly number[], json: boolean) {
    const words = Math.ceil(vocabSize / 32);
    this.masks = [0, 1, 2, 3].map(() => new Uint32Array(words));
    this.shapes = Array.from({ length: vocabSize }, (_, t) => shapeOf(tokenizer.tokenBytes(t), !json));
    const special = new Set(specialIds);
    this.shapes.forEach((s, t) => {
      for (let k = 0; k < 4; k++) {
        const allowed = special.has(t) ? k === 0 : s.allContinuation ? s.length <= k : s.ok && s.lead === k;
        if (allowed) this.masks[k][t >>> 5] |= 1 << (t & 31);
      }
    });
  }

  /** The state after `token` in state `k`. */
  next(k: number, token: number): number {
    const s = this.shapes[token];
    if (!s) return 0;
    return s.allContinuation ? Math.max(0, k - s.length) : s.open;
  }

  /** grammar AND guard for state k, in place; left as the grammar gave it if nothing would remain. */
  apply(mask: Int32Array, k: number): Int32Array {
    const guard = this.masks[k];
    let any = 0;
    for (let w = 0; w < mask.length; w++) any |= mask[w] & guard[w];
    if (any === 0) return mask;
    for (let w = 0; w < mask.length; w++) mask[w] &= guard[w];
    return mask;
  }
}
