// Structured output's grammar side: JSON schemas become grammars over the vocabulary,
// and each constrained sequence has a matcher that says which tokens may come next
// (vLLM's bitmask, one bit a token). xgrammar's WASM build does the work on a worker
// thread (grammar_worker.ts); this class is its main-thread face.
import type { ModelTokenizer } from "../model/tokenizer.ts";

export type GrammarJob =
  | {
      id: number;
      op: "init";
      vocab: string[];
      vocabType: "byte_fallback" | "byte_level" | "raw";
      vocabSize: number;
      stopTokenIds: number[];
    }
  | { id: number; op: "compile"; key: string; schema: string | null; regex: string | null }
  | { id: number; op: "open"; key: string }
  | { id: number; op: "accept"; matcher: number; token: number }
  | { id: number; op: "mask"; matcher: number }
  | { id: number; op: "close"; matcher: number };
export type GrammarReply = {
  id: number;
  error?: string;
  matcher?: number;
  ok?: boolean;
  terminated?: boolean;
  mask?: Int32Array;
};
type JobBody = GrammarJob extends infer J ? (J extends { id: number } ? Omit<J, "id"> : never) : never;

/** A schema the grammar compiler refused, or a grammar worker that failed. */
export class GrammarError extends Error {}

/** What a constrained request asks for: any JSON object, or JSON valid against a schema. */
export type GrammarSpec =
  | { kind: "json_object" }
  | { kind: "json_schema"; schema: Record<string, unknown> }
  | { kind: "regex"; pattern: string };

export class GrammarService {
  private worker: Worker | null = null;
  private ready: Promise<void> | null = null;
  private nextId = 0;
  private readonly pending = new Map<number, { resolve: (r: GrammarReply) => void; reject: (e: Error) => void }>();
  private readonly jsonMatchers = new Set<number>();

  constructor(
    private readonly tokenizer: ModelTokenizer,
    private readonly vocabSize: number,
    private readonly stopTokenIds: number[],
  ) {}

  private post(body: JobBody): Promise<GrammarReply> {
    const worker = this.start();
    const id = this.nextId++;
    return new Promise<GrammarReply>((resolve, reject) => {
      this.pending.set(id, { resolve, reject });
      worker.postMessage({ ...body, id });
    }).then((r) => {
      if (r.error) throw new GrammarError(r.error);
      return r;
    });
  }

  private start(): Worker {
    if (this.worker) return this.worker;
    const worker = new Worker(new URL("./grammar_worker.ts", import.meta.url).href);
    worker.onmessage = (event: MessageEvent<GrammarReply>) => {
      const p = this.pending.get(event.data.id);
      this.pending.delete(event.data.id);
      p?.resolve(event.data);
    };
    worker.onerror = (event) => {
      // An abort inside xgrammar: everything it held is gone; the next job starts afresh.
      for (const p of this.pending.values()) p.reject(new GrammarError(`the grammar engine failed: ${event.message}`));
      this.pending.clear();
      this.worker = null;
      this.ready = null;
      worker.terminate();
    };
    worker.unref();
    this.worker = worker;
    return worker;
  }

  private init(): Promise<void> {
    this.ready ??= (async () => {
      const vocab = Array.from({ length: this.vocabSize }, (_, i) => this.tokenizer.idToToken(i) ?? "");
      await this.post({
        op: "init",
        vocab,
        vocabType: this.tokenizer.vocabType,
        vocabSize: this.vocabSize,
        stopTokenIds: this.stopTokenIds,
      });
    })();
    return this.ready;
  }

  /** Compiles (or finds) the grammar for a spec; its key opens matchers. */
  async compile(spec: GrammarSpec): Promise<string> {
    await this.init();
    if (spec.kind === "regex") {
      const key = `regex:${spec.pattern}`;
      await this.post({ op: "compile", key, schema: null, regex: spec.pattern });
      return key;
    }
    const schema = JSON.stringify(spec.kind === "json_object" ? { type: "object" } : spec.schema);
    const key = `json:${schema}`;
    await this.post({ op: "compile", key, schema, regex: null });
    return key;
  }

  async open(key: string): Promise<number> {
    await this.init();
    const matcher = (await this.post({ op: "open", key })).matcher!;
    if (key.startsWith("json:")) this.jsonMatchers.add(matcher);
    return matcher;
  }

  /** Whether a matcher's grammar is JSON (whose text may hold no raw control character). */
  isJson(matcher: number): boolean {
    return this.jsonMatchers.has(matcher);
  }

  /** The tokens allowed next, as 32-bit words (bit t % 32 of word t / 32). */
  async mask(matcher: number): Promise<Int32Array> {
    return (await this.post({ op: "mask", matcher })).mask!;
  }

  /** Advances the matcher by a sampled token; false if the grammar did not allow it. */
  async accept(matcher: number, token: number): Promise<boolean> {
    return (await this.post({ op: "accept", matcher, token })).ok === true;
  }

  close(matcher: number): void {
    this.jsonMatchers.delete(matcher);
    if (this.worker) void this.post({ op: "close", matcher }).catch(() => {});
  }

  terminate(): void {
    this.worker?.terminate();
    this.worker = null;
    this.ready = null;
  }
}
