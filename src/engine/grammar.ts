// Structured output's grammar side: JSON schemas become grammars over the vocabulary,
// and each constrained sequence has a matcher that says which tokens may come next
// (vLLM's bitmask, one bit a token). xgrammar's WASM build does the work on a worker
// thread (grammar_worker.ts); this class is its main-thread face.
import { JobWorker } from "../model/job_worker.ts";
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

/** Grammar workers: masks of different sequences are made in parallel (two cores here). */
const GRAMMAR_WORKERS = 2;

/** One worker thread running xgrammar, initialised with the vocabulary before its first job. */
class GrammarWorker {
  private ready: Promise<void> | null = null;
  openMatchers = 0;
  private readonly worker: JobWorker<GrammarReply>;

  constructor(private readonly init: () => JobBody) {
    this.worker = new JobWorker<GrammarReply>(
      new URL("./grammar_worker.ts", import.meta.url),
      // An abort inside xgrammar: everything the worker held is gone; the next job starts afresh.
      (message) => new GrammarError(`the grammar engine failed: ${message}`),
      undefined,
      () => {
        this.ready = null;
        this.openMatchers = 0;
      },
    );
  }

  private async post(body: JobBody): Promise<GrammarReply> {
    const r = await this.worker.post(body);
    if (r.error) throw new GrammarError(r.error);
    return r;
  }

  /** Posts `body` once the worker knows the vocabulary. */
  async run(body: JobBody): Promise<GrammarReply> {
    if (body.op === "close" && !this.worker.running) return { id: -1 }; // nothing is open on a stopped worker
    this.ready ??= this.post(this.init()).then(() => {});
    await this.ready;
    return this.post(body);
  }

  terminate(): void {
    this.worker.terminate();
    this.ready = null;
  }
}

export class GrammarService {
  private readonly workers: GrammarWorker[];
  private nextMatcher = 1;
  /** Each open matcher: its worker, its id there, and whether its grammar is JSON. */
  private readonly matchers = new Map<number, { worker: GrammarWorker; local: number; json: boolean }>();

  constructor(
    private readonly tokenizer: ModelTokenizer,
    private readonly vocabSize: number,
    private readonly stopTokenIds: number[],
  ) {
    let vocab: string[] | null = null;
    const init = (): JobBody => {
      vocab ??= Array.from({ length: this.vocabSize }, (_, i) => this.tokenizer.idToToken(i) ?? "");
      return {
        op: "init",
        vocab,
        vocabType: this.tokenizer.vocabType,
        vocabSize: this.vocabSize,
        stopTokenIds: this.stopTokenIds,
      };
    };
    this.workers = Array.from({ length: GRAMMAR_WORKERS }, () => new GrammarWorker(init));
  }

  /** Compiles (or finds) the grammar for a spec on every worker; its key opens matchers. */
  async compile(spec: GrammarSpec): Promise<string> {
    let job: JobBody;
    if (spec.kind === "regex") job = { op: "compile", key: `regex:${spec.pattern}`, schema: null, regex: spec.pattern };
    else {
      const schema = JSON.stringify(spec.kind === "json_object" ? { type: "object" } : spec.schema);
      job = { op: "compile", key: `json:${schema}`, schema, regex: null };
    }
    await Promise.all(this.workers.map((w) => w.run(job)));
    return (job as { key: string }).key;
  }

  /** A matcher for a compiled grammar, on the worker with the fewest open. */
  async open(key: string): Promise<number> {
    const worker = this.workers.reduce((a, w) => (w.openMatchers < a.openMatchers ? w : a));
    worker.openMatchers += 1;
    try {
      const local = (await worker.run({ op: "open", key })).matcher!;
      const id = this.nextMatcher++;
      this.matchers.set(id, { worker, local, json: key.startsWith("json:") });
      return id;
    } catch (e) {
      worker.openMatchers -= 1;
      throw e;
    }
  }

  private entry(matcher: number) {
    const e = this.matchers.get(matcher);
    if (!e) throw new GrammarError(`no grammar matcher ${matcher}`);
    return e;
  }

  /** Whether a matcher's grammar is JSON (whose text may hold no raw control character). */
  isJson(matcher: number): boolean {
    return this.matchers.get(matcher)?.json ?? false;
  }

  /** The tokens allowed next, as 32-bit words (bit t % 32 of word t / 32). */
  async mask(matcher: number): Promise<Int32Array> {
    const e = this.entry(matcher);
    return (await e.worker.run({ op: "mask", matcher: e.local })).mask!;
  }

  /** Advances the matcher by a sampled token; false if the grammar did not allow it. */
  async accept(matcher: number, token: number): Promise<boolean> {
    const e = this.entry(matcher);
    return (await e.worker.run({ op: "accept", matcher: e.local, token })).ok === true;
  }

  close(matcher: number): void {
    const e = this.matchers.get(matcher);
    if (!e) return;
    this.matchers.delete(matcher);
    e.worker.openMatchers = Math.max(0, e.worker.openMatchers - 1);
    void e.worker.run({ op: "close", matcher: e.local }).catch(() => {});
  }

  terminate(): void {
    for (const w of this.workers) w.terminate();
  }
}
