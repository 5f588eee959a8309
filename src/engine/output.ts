// A request's output text: incremental detokenizing plus stop strings. A stop
// string may span tokens; the text that could still turn into one is held back
// (vLLM's stop buffer) so that a stream never shows part of a stop string.
import type { ModelTokenizer } from "../model/tokenizer.ts";
import { IncrementalDetokenizer } from "./detokenizer.ts";

export class OutputText {
  private readonly detokenizer: IncrementalDetokenizer;
  private text = "";
  private emitted = 0;
  private readonly holdBack: number;
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
   * Takes the newest token (already in `ids`) and returns the text to emit now.
   * checkStops: false while min_tokens holds stops off. final: the request ends here.
   */
  update(ids: readonly number[], checkStops: boolean, final: boolean): { delta: string; stopped: boolean } {
    const before = this.text.length;
    this.text += this.detokenizer.next(ids);
    if (final) this.text += this.detokenizer.flush(ids);
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
    const end = stopped || final ? this.text.length : Math.max(this.emitted, this.text.length - this.holdBack);
    const delta = this.text.slice(this.emitted, end);
    this.emitted = Math.max(this.emitted, end);
    return { delta, stopped };
  }

  /** What was held back, for a request that ends for another reason (length, abort). */
  flush(ids: readonly number[]): string {
    this.text += this.detokenizer.flush(ids);
    const delta = this.text.slice(this.emitted);
    this.emitted = this.text.length;
    return delta;
  }
}
