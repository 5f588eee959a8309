// Tokenizing off the event loop: small inputs are tokenized in place (a worker round
// trip costs more than they do), large ones on one worker thread that holds its own
// copy of the tokenizer. The worker starts on first use and never keeps the process alive.
import type { ChatMessage, ModelTokenizer } from "./tokenizer.ts";

/** Inputs up to this many characters are tokenized on the calling thread (about 3 ms). */
export const IN_PLACE_CHARS_MAX = 1000;
/** Chats up to this many messages (and IN_PLACE_CHARS_MAX characters) render in place. */
const IN_PLACE_MESSAGES_MAX = 16;
/** Jobs waiting for the worker; more is a sign of a flood, refused rather than queued. */
export const WORKER_JOBS_MAX = 256;

type JobBody =
  | { kind: "encode"; text: string; addSpecialTokens: boolean }
  | { kind: "chat"; messages: ChatMessage[]; addGenerationPrompt: boolean; tools: unknown[] | null };
export type TokenizeJob = JobBody & { id: number };
export type TokenizeResult = { id: number; ids: number[] } | { id: number; error: string };

/** The tokenizer refused the input (a chat template that does not render it). */
export class TokenizeError extends Error {}

/** The worker has WORKER_JOBS_MAX jobs waiting. */
export class TokenizerBusyError extends Error {}

export class TokenizerThread {
  private worker: Worker | null = null;
  private nextId = 0;
  private readonly pending = new Map<number, { resolve: (ids: number[]) => void; reject: (e: Error) => void }>();

  constructor(private readonly tokenizer: ModelTokenizer) {}

  async encode(text: string, addSpecialTokens = true): Promise<number[]> {
    if (text.length <= IN_PLACE_CHARS_MAX) return this.tokenizer.encode(text, addSpecialTokens);
    return this.run({ kind: "encode", text, addSpecialTokens });
  }

  async chat(messages: ChatMessage[], addGenerationPrompt = true, tools: unknown[] | null = null): Promise<number[]> {
    const chars = messages.reduce((a, m) => a + m.content.length, 0);
    if (chars <= IN_PLACE_CHARS_MAX && messages.length <= IN_PLACE_MESSAGES_MAX) {
      try {
        return this.tokenizer.applyChatTemplate(messages, addGenerationPrompt, tools).ids;
      } catch (e) {
        throw new TokenizeError((e as Error).message);
      }
    }
    return this.run({ kind: "chat", messages, addGenerationPrompt, tools });
  }

  private run(job: JobBody): Promise<number[]> {
    if (this.pending.size >= WORKER_JOBS_MAX)
      return Promise.reject(new TokenizerBusyError(`${WORKER_JOBS_MAX} large inputs are already being tokenized`));
    const id = this.nextId++;
    const promise = new Promise<number[]>((resolve, reject) => this.pending.set(id, { resolve, reject }));
    this.start().postMessage({ ...job, id });
    return promise;
  }

  private start(): Worker {
    if (this.worker) return this.worker;
    const worker = new Worker(new URL("./tokenizer_worker.ts", import.meta.url).href);
    worker.postMessage({ init: this.tokenizer.source });
    worker.onmessage = (event: MessageEvent<TokenizeResult>) => {
      const r = event.data;
      const p = this.pending.get(r.id);
      this.pending.delete(r.id);
      if (!p) return;
      if ("ids" in r) p.resolve(r.ids);
      else p.reject(new TokenizeError(r.error));
    };
    worker.onerror = (event) => {
      // A crashed worker fails what it held; the next job starts a fresh one.
      for (const p of this.pending.values()) p.reject(new Error(`the tokenizer thread failed: ${event.message}`));
      this.pending.clear();
      this.worker = null;
    };
    worker.unref();
    this.worker = worker;
    return worker;
  }

  terminate(): void {
    this.worker?.terminate();
    this.worker = null;
  }
}
