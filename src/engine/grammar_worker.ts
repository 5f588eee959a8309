// xgrammar (WASM) on a thread of its own: JSON schemas compiled to grammars over the
// model's vocabulary, and one matcher per constrained sequence that gives the bitmask
// of tokens allowed next. A schema xgrammar cannot handle aborts its WASM module; here
// that ends this worker only, and the main thread starts a fresh one.
import xgr, { type CompiledGrammar, type GrammarCompiler, type GrammarMatcher } from "@mlc-ai/web-xgrammar";
import type { GrammarReply, GrammarJob } from "./grammar.ts";

declare const self: Worker;

/** Compiled grammars kept for reuse, oldest evicted first. */
const COMPILED_MAX = 64;
let compiler: GrammarCompiler | null = null;
const compiled = new Map<string, CompiledGrammar>();
const matchers = new Map<number, GrammarMatcher>();
let nextMatcher = 1;

async function handle(job: GrammarJob): Promise<GrammarReply> {
  switch (job.op) {
    case "init": {
      const info = await xgr.TokenizerInfo.createTokenizerInfo(
        job.vocab,
        job.vocabType,
        false,
        job.vocabSize,
        job.stopTokenIds,
      );
      compiler = await xgr.GrammarCompiler.createGrammarCompiler(info);
      return { id: job.id };
    }
    case "compile": {
      if (!compiled.has(job.key)) {
        // Compact JSON (no indent, "," and ":"): whitespace cannot run on until max_tokens.
        const grammar =
          job.regex !== null
            ? await compiler!.compileGrammar(await xgr.Grammar.fromStructuralTag({ type: "regex", pattern: job.regex }))
            : await compiler!.compileJSONSchema(job.schema!, false, -1, [",", ":"], true);
        if (compiled.size >= COMPILED_MAX) {
          const [oldest, g] = compiled.entries().next().value!;
          g.dispose();
          compiled.delete(oldest);
        }
        compiled.set(job.key, grammar);
      }
      return { id: job.id };
    }
    case "open": {
      const grammar = compiled.get(job.key);
      if (!grammar) return { id: job.id, error: "grammar not compiled" };
      const matcher = await xgr.GrammarMatcher.createGrammarMatcher(grammar);
      const id = nextMatcher++;
      matchers.set(id, matcher);
      return { id: job.id, matcher: id };
    }
    case "accept": {
      const m = matchers.get(job.matcher);
      const ok = m ? m.acceptToken(job.token) : false;
      return { id: job.id, ok };
    }
    case "mask": {
      const m = matchers.get(job.matcher);
      if (!m) return { id: job.id, error: `no matcher ${job.matcher}` };
      return { id: job.id, mask: await m.getNextTokenBitmask() };
    }
    case "close": {
      matchers.get(job.matcher)?.dispose();
      matchers.delete(job.matcher);
      return { id: job.id };
    }
  }
}

// Jobs run one at a time, in the order sent (an accept before the next mask).
let queue = Promise.resolve();
self.onmessage = (event: MessageEvent<GrammarJob>) => {
  const job = event.data;
  queue = queue.then(async () => {
    let reply: GrammarReply;
    try {
      reply = await handle(job);
    } catch (e) {
      reply = { id: job.id, error: String((e as Error)?.message ?? e).split("\n")[0] };
    }
    if (reply.mask) self.postMessage(reply, [reply.mask.buffer as ArrayBuffer]);
    else self.postMessage(reply);
  });
};
