// Incremental detokenizing that never emits half a character.
//
// Decoding token by token is wrong for SentencePiece (a leading "▁" becomes a
// space only in context) and for byte-fallback tokens (one character can span
// several tokens). So each new token decodes a short window of recent tokens
// twice, with and without it, and emits the difference, holding it back while
// the text ends in U+FFFD (an incomplete UTF-8 sequence).
//
//   ids:   ... | prefixOffset ........ readOffset ........ ids.length
//                 already emitted          pending, not yet emitted
import type { ModelTokenizer } from "../model/tokenizer.ts";

// Tokens of the prompt kept as left context for the first generated token.
const INITIAL_CONTEXT_TOKENS = 5;

export class IncrementalDetokenizer {
  private prefixOffset: number;
  private readOffset: number;

  constructor(
    private readonly tokenizer: ModelTokenizer,
    promptLength: number,
  ) {
    this.prefixOffset = Math.max(0, promptLength - INITIAL_CONTEXT_TOKENS);
    this.readOffset = promptLength;
  }

  /** The text that `ids` (prompt and output so far, the newest token last) adds. */
  next(ids: readonly number[]): string {
    const prefixText = this.tokenizer.decode(ids.slice(this.prefixOffset, this.readOffset));
    const fullText = this.tokenizer.decode(ids.slice(this.prefixOffset));
    if (fullText.length > prefixText.length && !fullText.endsWith("\uFFFD")) {
      this.prefixOffset = this.readOffset;
      this.readOffset = ids.length;
      return fullText.slice(prefixText.length);
    }
    return "";
  }

  /** What is still held back, as text (at the end of a request). */
  flush(ids: readonly number[]): string {
    if (this.readOffset >= ids.length) return "";
    const prefixText = this.tokenizer.decode(ids.slice(this.prefixOffset, this.readOffset));
    const fullText = this.tokenizer.decode(ids.slice(this.prefixOffset));
    this.prefixOffset = this.readOffset;
    this.readOffset = ids.length;
    return fullText.slice(prefixText.length);
  }
}
