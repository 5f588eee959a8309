// A request's output text: incremental detokenizing plus stop strings. A stop
// string may span tokens; the text that could still turn into one is held back
// (vLLM's stop buffer) so that a stream never shows part of a stop string. Tokens
// are released with the text they make: an output carries exactly the tokens whose
// text it carries, so that streamed logprobs line up with streamed text.
import type { ModelTokenizer } from "../model/tokenizer.ts";
import { IncrementalDetokenizer } from "./detokenizer.ts";

export class OutputText {
  private readonly detokenizer: IncrementalDetokenizer;
  private text = "";
  private emitted = 0;
  private readonly holdBack: number;
  /** Where the text of each token not yet released ends (-1: not decoded yet), oldest first. */
  private readonly pendingEnds: number[] = [];
  /** The stop string that ended the text, if one did. */
  stopString: string | null = null;

  constructor(
    tokenizer: ModelTokenizer,
    promptLength: number,
    private readonly stops: readonly string[],
  ) {
    this.detokenizer = new IncrementalDetokenizer(tokenizer, promptLength);
    this.holdBack = stops.length > 0 ? Math.max(...stops.map((s) => s.length)) - 1 : 0;
  }

  get fullText(): string {
    return this.text;
  }

  /**
   * Takes the newest token (already in `ids`) and returns the text to emit now and how
   * many tokens (oldest first, this one included) that text completes.
   * checkStops: false while min_tokens holds stops off. final: the request ends here.
   */
  update(
    ids: readonly number[],
    checkStops: boolean,
    final: boolean,
  ): { delta: string; stopped: boolean; released: number } {
    const before = this.text.length;
    this.pendingEnds.push(-1);
    this.text += this.detokenizer.next(ids);
    if (final) this.text += this.detokenizer.flush(ids);
    // Text grew: every token so far is decoded (a token that adds nothing waits for the next).
    if (this.text.length > before) {
      for (let i = 0; i < this.pendingEnds.length; i++)
        if (this.pendingEnds[i] < 0) this.pendingEnds[i] = this.text.length;
    }
    let stopped = false;
    if (checkStops && this.stops.length > 0) {
      // Only a match that ends in the new text is new; look back far enough to catch one that spans.
      const from = Math.max(0, before - this.holdBack);
      let cut = -1;
      for (const stop of this.stops) {
        const at = this.text.indexOf(stop, from);
        if (at >= 0 && (cut < 0 || at < cut)) {
          cut = at;
          this.stopString = stop;
        }
      }
      if (cut >= 0) {
        this.text = this.text.slice(0, cut);
        stopped = true;
      }
    }
    const end = stopped || final ? this.text.length : this.tokenBoundary(this.text.length - this.holdBack);
    const delta = this.text.slice(this.emitted, end);
    this.emitted = Math.max(this.emitted, end);
    return { delta, stopped, released: stopped || final ? this.releaseAll() : this.releaseUpTo(this.emitted) };
  }

  /**
   * What was held back, for a request that ends for another reason (a stop token, abort):
   * `ids` are the tokens whose text counts; every token taken so far is released.
   */
  flush(ids: readonly number[]): { delta: string; released: number } {
    this.text += this.detokenizer.flush(ids);
    const delta = this.text.slice(this.emitted);
    this.emitted = this.text.length;
    return { delta, released: this.releaseAll() };
  }

  /** Takes a token whose text is never shown (a stop token); it goes out with the next release. */
  addSilent(): void {
    this.pendingEnds.push(-1);
  }

  /** The end of the last pending token whose text ends by `offset` (the text is emitted in whole tokens). */
  private tokenBoundary(offset: number): number {
    let end = this.emitted;
    for (const e of this.pendingEnds) {
      if (e < 0 || e > offset) break;
      end = e;
    }
    return end;
  }

  private releaseUpTo(offset: number): number {
    let n = 0;
    while (n < this.pendingEnds.length && this.pendingEnds[n] >= 0 && this.pendingEnds[n] <= offset) n++;
    this.pendingEnds.splice(0, n);
    return n;
  }

  private releaseAll(): number {
    const n = this.pendingEnds.length;
    this.pendingEnds.length = 0;
    return n;
  }
}
