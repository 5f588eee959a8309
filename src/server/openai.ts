// The OpenAI endpoints' logic, shared by every transport: a request becomes engine
// requests (prepare, start), and their outputs become one stream of OpenAI chunks
// (chunks). SSE and the WebSocket send those chunks; a non-streamed answer and the
// batch route fold the same chunks into one response (collect). One path from the
// engine to the wire, so a number is computed in one place.
import { randomUUID } from "node:crypto";
import { AsyncQueue } from "../engine/async_queue.ts";
import type { LLMEngine, RequestOutput } from "../engine/llm_engine.ts";
import { samplingFromSnake } from "../engine/params.ts";
import { DEFAULT_SAMPLING, type SamplingParams, type TokenLogprob } from "../engine/request.ts";
import type { ChatMessage, ModelTokenizer } from "../model/tokenizer.ts";
import { toolFamilyOf, toolModeOf, ToolCallStream, type ToolCall, type ToolCallDelta, type ToolMode } from "./tools.ts";
import { TokenizerBusyError, TokenizeError, TokenizerThread } from "../model/tokenizer_thread.ts";
import { GrammarError, type GrammarSpec } from "../engine/grammar.ts";
import { grammarSpecFor } from "./structured.ts";
import { ApiError, notFoundModel } from "./errors.ts";
import type {
  BatchCompletionRequest,
  ChatCompletionRequest,
  ChatCompletionResponse,
  CompletionRequest,
  CompletionResponse,
} from "./schemas.ts";

type Json = Record<string, unknown>;

/**
 * A prompt of more characters than this many times (tokens x longest token) cannot fit:
 * a normalizer may compose up to four code points into one (NFC) before tokenizing.
 */
const NORMALIZED_CHARS_PER_CHAR_MAX = 4;

interface Job {
  choice: number; // choice index in the response
  prompt: number; // which prompt of the request
  promptIds: number[];
  params: SamplingParams;
  matcher: number | null; // structured output: the grammar matcher this sequence follows
}

export interface Prepared {
  kind: "completion" | "chat";
  id: string;
  created: number;
  jobs: Job[];
  logprobs: number | null;
  includeUsage: boolean;
  echo: boolean;
  tools: ToolMode | null; // chat with tools: how calls are made and found
}

/** One engine output, tagged with the choice it belongs to. */
interface Tagged {
  choice: number;
  out: RequestOutput;
}

export interface Usage {
  prompt_tokens: number;
  completion_tokens: number;
  total_tokens: number;
  prompt_tokens_details: { cached_tokens: number };
}

/** A started request: its outputs as they come, the last output of each choice, and cancel. */
export class Running {
  readonly last = new Map<number, RequestOutput>();
  constructor(
    readonly prepared: Prepared,
    readonly outputs: AsyncGenerator<Tagged>,
    /** Aborts whatever is still running (a client gone); a no-op once finished. */
    readonly cancel: () => void,
  ) {}

  /** Usage of the prompts whose jobs pass `filter` (all of them by default), as far as generated. */
  usage(filter: (job: Job) => boolean = () => true): Usage {
    let prompt = 0;
    let completion = 0;
    let cached = 0;
    const counted = new Set<number>();
    for (const job of this.prepared.jobs.filter(filter)) {
      const last = this.last.get(job.choice);
      completion += last?.numOutputTokens ?? 0;
      if (counted.has(job.prompt)) continue; // n choices share one prompt
      counted.add(job.prompt);
      prompt += job.promptIds.length;
      cached += last?.numCachedTokens ?? 0;
    }
    return {
      prompt_tokens: prompt,
      completion_tokens: completion,
      total_tokens: prompt + completion,
      prompt_tokens_details: { cached_tokens: cached },
    };
  }
}

interface CompletionLogprobs {
  tokens: string[];
  token_logprobs: number[];
  top_logprobs: Record<string, number>[];
  text_offset: number[];
}
interface ChatLogprobs {
  content: {
    token: string;
    logprob: number;
    bytes: number[];
    top_logprobs: { token: string; logprob: number; bytes: number[] }[];
  }[];
}
interface ChoiceChunk {
  index: number;
  text?: string;
  delta?: { role?: "assistant"; content?: string; tool_calls?: ToolCallDelta[] };
  logprobs: CompletionLogprobs | ChatLogprobs | null;
  finish_reason: string | null;
  stop_reason?: string | number | null;
}
export interface Chunk {
  id: string;
  object: string;
  created: number;
  model: string;
  choices: ChoiceChunk[];
  usage?: Usage;
}

export interface ServiceLimits {
  maxSeqsPerRequest: number; // prompts x n of one API call
}

export class OpenAIService {
  readonly tokenizerThread: TokenizerThread;

  constructor(
    private readonly engine: LLMEngine,
    readonly servedModelName: string,
    private readonly limits: ServiceLimits,
  ) {
    this.tokenizerThread = new TokenizerThread(engine.model.tokenizer);
  }

  private get tok(): ModelTokenizer {
    return this.engine.model.tokenizer;
  }

  get maxModelLen(): number {
    return this.engine.maxModelLen;
  }

  checkModel(model: string | undefined): void {
    if (model !== undefined && model !== this.servedModelName) throw notFoundModel(model);
  }

  /** The most characters a prompt that fits the context can have (Infinity: no bound can be drawn). */
  get promptCharsMax(): number {
    return NORMALIZED_CHARS_PER_CHAR_MAX * this.tok.maxTokenChars * this.engine.maxModelLen;
  }

  /** Refuses text that cannot fit the context before paying to tokenize it. */
  private checkChars(chars: number, param: string): void {
    if (chars > this.promptCharsMax) {
      throw new ApiError(
        400,
        `this model's maximum context length is ${this.engine.maxModelLen} tokens; a ${param} of ${chars} characters cannot fit (at most ${this.promptCharsMax} characters could)`,
        "invalid_request_error",
        param,
        "context_length_exceeded",
      );
    }
  }

  private static tokenizerFailure(e: unknown, param: string): never {
    if (e instanceof TokenizerBusyError)
      throw new ApiError(
        429,
        `The server is busy tokenizing: ${e.message}.`,
        "rate_limit_error",
        null,
        "tokenizer_busy",
        { "retry-after": "1" },
      );
    if (e instanceof TokenizeError)
      throw new ApiError(
        400,
        `the chat template could not render these messages: ${e.message}`,
        "invalid_request_error",
        param,
      );
    throw e;
  }

  async encode(text: string, addSpecialTokens = true, param = "prompt"): Promise<number[]> {
    this.checkChars(text.length, param);
    return this.tokenizerThread.encode(text, addSpecialTokens).catch((e) => OpenAIService.tokenizerFailure(e, param));
  }

  async chatPromptIds(
    messages: ChatCompletionRequest["messages"],
    addGenerationPrompt = true,
    tools: ChatCompletionRequest["tools"] = null,
  ): Promise<number[]> {
    const flat = messages.map(templateMessage);
    // A template renders every message's content (real ones do), so their sum bounds the prompt.
    this.checkChars(
      flat.reduce((a, m) => a + m.content.length, 0),
      "messages",
    );
    return this.tokenizerThread
      .chat(flat, addGenerationPrompt, tools && tools.length > 0 ? tools : null)
      .catch((e) => OpenAIService.tokenizerFailure(e, "messages"));
  }

  /** A token's text as OpenAI reports it in logprobs: "▁" as a space, byte tokens as their byte. */
  tokenText(id: number): string {
    const piece = this.tok.idToToken(id) ?? "";
    const byte = /^<0x([0-9A-Fa-f]{2})>$/.exec(piece);
    if (byte) return String.fromCharCode(parseInt(byte[1], 16));
    return piece.replaceAll("\u2581", " ").replaceAll("\u0120", " ").replaceAll("\u010a", "\n");
  }

  private tokenBytes(id: number): number[] {
    return [...this.tok.tokenBytes(id)];
  }

  private params(
    body: CompletionRequest | ChatCompletionRequest | BatchCompletionRequest,
    maxTokens: number | null,
    logprobs: number | null,
  ): SamplingParams {
    return samplingFromSnake({ ...body, max_tokens: maxTokens ?? undefined, logprobs } as never, {
      ...DEFAULT_SAMPLING,
      maxTokens: maxTokens ?? 16,
    });
  }

  /** n choices a prompt, each checked by the engine; refused past --max-seqs-per-request first. */
  private jobs(prompts: number[][], params: SamplingParams, n: number): Job[] {
    for (const ids of prompts) this.engine.validate(ids, params);
    const jobs: Job[] = [];
    prompts.forEach((promptIds, p) => {
      for (let i = 0; i < n; i++) {
        // Each of the n choices draws its own stream; a seeded request stays reproducible.
        const seed = params.seed === null ? null : params.seed + i;
        jobs.push({ choice: p * n + i, prompt: p, promptIds, params: { ...params, seed }, matcher: null });
      }
    });
    return jobs;
  }

  private checkSequences(numPrompts: number, n: number): void {
    const max = this.limits.maxSeqsPerRequest;
    if (numPrompts * n > max) {
      throw new ApiError(
        400,
        `the request asks for ${numPrompts * n} sequences (${numPrompts} prompts x n=${n}); the limit is ${max} (--max-seqs-per-request)`,
        "invalid_request_error",
        "n",
      );
    }
  }

  /**
   * Compiles the response format's grammar (cached by schema) and opens a matcher for each
   * job; a schema the compiler refuses is a 400. The engine closes each matcher when its
   * request finishes; start() closes those it never submitted.
   */
  private async constrain(jobs: Job[], spec: GrammarSpec | null, param: string): Promise<Job[]> {
    if (spec === null) return jobs;
    const grammar = this.engine.grammar;
    try {
      const key = await grammar.compile(spec);
      for (const job of jobs) job.matcher = await grammar.open(key);
    } catch (e) {
      for (const job of jobs) if (job.matcher !== null) grammar.close(job.matcher);
      if (e instanceof GrammarError)
        throw new ApiError(400, `the ${param} cannot be compiled: ${e.message}`, "invalid_request_error", param);
      throw e;
    }
    return jobs;
  }

  private async promptIds(prompt: CompletionRequest["prompt"]): Promise<number[][]> {
    if (typeof prompt === "string") return [await this.encode(prompt)];
    if (prompt.length > 0 && typeof prompt[0] === "number") return [prompt as number[]];
    const out: number[][] = [];
    for (const p of prompt as (string | number[])[]) out.push(typeof p === "string" ? await this.encode(p) : p);
    return out;
  }

  private static numPrompts(prompt: CompletionRequest["prompt"]): number {
    return typeof prompt === "string" || typeof prompt[0] === "number" ? 1 : prompt.length;
  }

  /** OpenAI refuses stream_options on a request that does not stream. */
  private static checkStreamOptions(body: { stream?: boolean | null; stream_options?: unknown }): void {
    if (body.stream_options && !body.stream)
      throw new ApiError(
        400,
        "stream_options is only allowed when stream is true.",
        "invalid_request_error",
        "stream_options",
      );
  }

  private static newId(prefix: string): { id: string; created: number } {
    return { id: `${prefix}-${randomUUID().replaceAll("-", "")}`, created: Math.floor(Date.now() / 1000) };
  }

  async prepareCompletion(body: CompletionRequest): Promise<Prepared> {
    this.checkModel(body.model);
    OpenAIService.checkStreamOptions(body);
    this.checkSequences(OpenAIService.numPrompts(body.prompt), body.n ?? 1);
    const spec = grammarSpecFor(body);
    const prompts = await this.promptIds(body.prompt);
    const params = this.params(body, body.max_tokens ?? 16, body.logprobs ?? null);
    return {
      kind: "completion",
      ...OpenAIService.newId("cmpl"),
      jobs: await this.constrain(
        this.jobs(prompts, params, body.n ?? 1),
        spec,
        body.structured_outputs ? "structured_outputs" : "response_format",
      ),
      logprobs: body.logprobs ?? null,
      includeUsage: body.stream_options?.include_usage === true,
      echo: body.echo === true,
      tools: null,
    };
  }

  async prepareBatch(body: BatchCompletionRequest): Promise<Prepared> {
    this.checkModel(body.model);
    this.checkSequences(body.prompts.length, body.n ?? 1);
    const prompts: number[][] = [];
    for (const p of body.prompts) prompts.push(typeof p === "string" ? await this.encode(p, true, "prompts") : p);
    const params = this.params(body, body.max_tokens ?? 16, body.logprobs ?? null);
    return {
      kind: "completion",
      ...OpenAIService.newId("cmpl"),
      jobs: this.jobs(prompts, params, body.n ?? 1),
      logprobs: body.logprobs ?? null,
      includeUsage: false,
      echo: false,
      tools: null,
    };
  }

  async prepareChat(body: ChatCompletionRequest): Promise<Prepared> {
    this.checkModel(body.model);
    OpenAIService.checkStreamOptions(body);
    this.checkSequences(1, body.n ?? 1);
    const tools = toolModeOf(body, toolFamilyOf(this.tok.chatTemplate));
    const spec = tools.grammar ?? grammarSpecFor(body);
    if (!body.logprobs && body.top_logprobs)
      throw new ApiError(400, "top_logprobs requires logprobs to be true", "invalid_request_error", "top_logprobs");
    const promptIds = await this.chatPromptIds(body.messages, body.add_generation_prompt ?? true, body.tools);
    const logprobs = body.logprobs ? (body.top_logprobs ?? 0) : null;
    // Without a limit, a chat reply may use the rest of the context, as vLLM does.
    const maxTokens =
      body.max_completion_tokens ?? body.max_tokens ?? Math.max(1, this.engine.maxModelLen - promptIds.length);
    const params = this.params(body, maxTokens, logprobs);
    return {
      kind: "chat",
      ...OpenAIService.newId("chatcmpl"),
      jobs: await this.constrain(
        this.jobs([promptIds], params, body.n ?? 1),
        spec,
        tools.grammar ? "tools" : body.structured_outputs ? "structured_outputs" : "response_format",
      ),
      logprobs,
      includeUsage: body.stream_options?.include_usage === true,
      echo: false,
      tools: tools.mode,
    };
  }

  /**
   * Starts every job now (so that a full queue is an error before any response is
   * sent) and returns their outputs as they come, tagged by choice.
   */
  start(prepared: Prepared): Running {
    const ids: string[] = [];
    const cancel = () => {
      for (const id of ids) this.engine.abort(id); // no-op for finished ones
    };
    // One queue for every choice's outputs; null once the last choice has closed.
    const merged = new AsyncQueue<Tagged | null>(cancel);
    let open = prepared.jobs.length;
    try {
      for (const job of prepared.jobs) {
        const sink = {
          push: (out: RequestOutput) => merged.push({ choice: job.choice, out }),
          close: () => --open === 0 && merged.push(null),
        };
        ids.push(this.engine.submit(job.promptIds, job.params, sink, prepared.id, job.matcher));
      }
    } catch (e) {
      cancel();
      // Matchers of jobs the engine never took are still ours to close.
      for (const job of prepared.jobs.slice(ids.length))
        if (job.matcher !== null) this.engine.grammar.close(job.matcher);
      throw e;
    }
    const running: Running = new Running(prepared, outputs(), cancel);
    async function* outputs(): AsyncGenerator<Tagged> {
      try {
        for await (const item of merged) {
          if (item === null) return;
          running.last.set(item.choice, item.out);
          yield item;
        }
      } finally {
        cancel();
      }
    }
    return running;
  }

  private completionLogprobs(lps: TokenLogprob[], startOffset: number): CompletionLogprobs {
    const tokens: string[] = [];
    const offsets: number[] = [];
    let offset = startOffset;
    for (const lp of lps) {
      const text = this.tokenText(lp.tokenId);
      tokens.push(text);
      offsets.push(offset);
      offset += text.length;
    }
    return {
      tokens,
      token_logprobs: lps.map((lp) => lp.logprob),
      top_logprobs: lps.map((lp) => Object.fromEntries(lp.top.map((t) => [this.tokenText(t.tokenId), t.logprob]))),
      text_offset: offsets,
    };
  }

  private chatLogprobs(lps: TokenLogprob[]): ChatLogprobs {
    return {
      content: lps.map((lp) => ({
        token: this.tokenText(lp.tokenId),
        logprob: lp.logprob,
        bytes: this.tokenBytes(lp.tokenId),
        top_logprobs: lp.top.map((t) => ({
          token: this.tokenText(t.tokenId),
          logprob: t.logprob,
          bytes: this.tokenBytes(t.tokenId),
        })),
      })),
    };
  }

  /**
   * The request's OpenAI chunks: a first chunk a choice (chat: its role; completions with
   * echo: the prompt), one a step that adds text or tokens, each carrying exactly the
   * tokens whose text it carries, and the usage chunk when asked for.
   */
  async *chunks(running: Running): AsyncGenerator<Chunk> {
    const prepared = running.prepared;
    const chat = prepared.kind === "chat";
    const base = {
      id: prepared.id,
      object: chat ? "chat.completion.chunk" : "text_completion",
      created: prepared.created,
      model: this.servedModelName,
    };
    const offsets = new Map<number, number>(); // completions: text so far, for text_offset
    for (const job of prepared.jobs) {
      if (chat)
        yield {
          ...base,
          choices: [
            { index: job.choice, delta: { role: "assistant", content: "" }, logprobs: null, finish_reason: null },
          ],
        };
      else if (prepared.echo) {
        const prefix = this.tok.decode(job.promptIds);
        offsets.set(job.choice, prefix.length);
        yield { ...base, choices: [{ index: job.choice, text: prefix, logprobs: null, finish_reason: null }] };
      }
    }
    // With tools, each choice's text passes a ToolCallStream, which turns it into content and call pieces.
    const toolStreams = new Map(
      prepared.jobs.map((j) => [j.choice, prepared.tools ? new ToolCallStream(prepared.tools) : null]),
    );
    for await (const { choice, out: raw } of running.outputs) {
      if (raw.error) throw new ApiError(500, `generation failed: ${raw.error}`, "internal_error");
      const tools = toolStreams.get(choice);
      let calls: ToolCallDelta[] = [];
      let out = raw;
      let finishReason: string | null = raw.finishReason;
      if (tools) {
        const now = tools.push(raw.text);
        let text = now.content;
        calls = now.calls;
        if (raw.finished) {
          const end = tools.finish();
          text += end.content;
          calls = [...calls, ...end.calls];
          // A call that ended: "tool_calls" (a named tool_choice ends with "stop", as vLLM does).
          if (end.called && raw.finishReason === "stop")
            finishReason = prepared.tools?.kind === "forced" && prepared.tools.named !== null ? "stop" : "tool_calls";
        }
        out = { ...raw, text };
      }
      if (out.text === "" && out.newLogprobs.length === 0 && calls.length === 0 && !out.finished) continue;
      const offset = offsets.get(choice) ?? 0;
      offsets.set(choice, offset + out.text.length);
      const logprobs =
        prepared.logprobs === null
          ? null
          : chat
            ? this.chatLogprobs(out.newLogprobs)
            : this.completionLogprobs(out.newLogprobs, offset);
      const text = chat ? { delta: out.text === "" ? {} : { content: out.text } } : { text: out.text };
      if (calls.length > 0) {
        // Call pieces go out in a chunk of their own; the end follows in the next.
        yield {
          ...base,
          choices: [{ index: choice, delta: { ...text.delta, tool_calls: calls }, logprobs, finish_reason: null }],
        };
        if (!out.finished) continue;
        yield {
          ...base,
          choices: [{ index: choice, delta: {}, logprobs: null, finish_reason: finishReason, stop_reason: null }],
        };
        continue;
      }
      const end = out.finished
        ? { finish_reason: finishReason, stop_reason: finishReason === out.finishReason ? out.stopReason : null }
        : { finish_reason: null };
      yield { ...base, choices: [{ index: choice, ...text, logprobs, ...end }] };
    }
    if (prepared.includeUsage) yield { ...base, choices: [], usage: running.usage() };
  }

  /** A non-streamed answer: the same chunks, folded. */
  async collect(running: Running): Promise<CompletionResponse | ChatCompletionResponse> {
    const prepared = running.prepared;
    const chat = prepared.kind === "chat";
    const folded = new Map<
      number,
      {
        text: string;
        logprobs: ChoiceChunk["logprobs"];
        finish: string | null;
        stop: string | number | null;
        calls: ToolCall[];
      }
    >();
    for (const job of prepared.jobs) {
      const empty =
        prepared.logprobs === null
          ? null
          : chat
            ? { content: [] }
            : { tokens: [], token_logprobs: [], top_logprobs: [], text_offset: [] };
      folded.set(job.choice, { text: "", logprobs: empty, finish: null, stop: null, calls: [] });
    }
    for await (const chunk of this.chunks(running)) {
      for (const c of chunk.choices) {
        const f = folded.get(c.index)!;
        f.text += (chat ? c.delta?.content : c.text) ?? "";
        if (c.logprobs !== null && f.logprobs !== null) appendLogprobs(f.logprobs, c.logprobs);
        for (const d of c.delta?.tool_calls ?? []) {
          const call = (f.calls[d.index] ??= {
            id: d.id ?? "",
            type: "function",
            function: { name: d.function.name ?? "", arguments: "" },
          });
          call.function.arguments += d.function.arguments;
        }
        if (c.finish_reason !== null) [f.finish, f.stop] = [c.finish_reason, c.stop_reason ?? null];
      }
    }
    const choices = prepared.jobs.map((job) => {
      const f = folded.get(job.choice)!;
      const message =
        f.calls.length > 0
          ? { role: "assistant" as const, content: f.text === "" ? null : f.text, tool_calls: f.calls }
          : { role: "assistant" as const, content: f.text };
      const body = chat ? { message } : { text: f.text };
      return { index: job.choice, ...body, logprobs: f.logprobs, finish_reason: f.finish, stop_reason: f.stop };
    });
    const object = chat ? "chat.completion" : "text_completion";
    return {
      id: prepared.id,
      object,
      created: prepared.created,
      model: this.servedModelName,
      choices,
      usage: running.usage(),
    } as CompletionResponse | ChatCompletionResponse;
  }

  /** The batch route's answer: one completion a prompt, in order, each with its own choices and usage. */
  async collectBatch(running: Running, n: number): Promise<CompletionResponse[]> {
    const all = (await this.collect(running)) as CompletionResponse;
    const numPrompts = running.prepared.jobs.length / n;
    return Array.from({ length: numPrompts }, (_, p) => ({
      ...all,
      id: `${all.id}-${p}`,
      choices: all.choices.filter((c) => Math.floor(c.index / n) === p).map((c) => ({ ...c, index: c.index % n })),
      usage: running.usage((job) => job.prompt === p),
    }));
  }
}

/**
 * A message as chat templates read it: content as one string, an assistant's tool calls with
 * their arguments as objects (Llama 3.x and Qwen templates write them with tojson), a tool
 * message's call id. Content is required except on an assistant message with tool calls.
 */
function templateMessage(m: ChatCompletionRequest["messages"][number], i: number): ChatMessage {
  const content = typeof m.content === "string" ? m.content : m.content ? m.content.map((p) => p.text).join("") : null;
  if (content === null && !(m.role === "assistant" && m.tool_calls?.length)) {
    throw new ApiError(
      400,
      `messages[${i}] (${m.role}) needs content`,
      "invalid_request_error",
      `messages.${i}.content`,
    );
  }
  if (m.role === "tool" && !m.tool_call_id)
    throw new ApiError(
      400,
      `messages[${i}] (tool) needs tool_call_id`,
      "invalid_request_error",
      `messages.${i}.tool_call_id`,
    );
  const out: ChatMessage = { role: m.role, content: content ?? "" };
  if (m.name !== undefined) out.name = m.name;
  if (m.tool_call_id !== undefined) out.tool_call_id = m.tool_call_id;
  if (m.tool_calls) {
    out.tool_calls = m.tool_calls.map((c) => {
      let args: unknown = c.function.arguments;
      try {
        args = JSON.parse(c.function.arguments);
      } catch {
        // left as the string it came as
      }
      return { id: c.id, type: "function", function: { name: c.function.name, arguments: args } };
    });
  }
  return out;
}

function appendLogprobs(into: CompletionLogprobs | ChatLogprobs, from: CompletionLogprobs | ChatLogprobs): void {
  if ("content" in into && "content" in from) into.content.push(...from.content);
  else if ("tokens" in into && "tokens" in from) {
    into.tokens.push(...from.tokens);
    into.token_logprobs.push(...from.token_logprobs);
    into.top_logprobs.push(...from.top_logprobs);
    into.text_offset.push(...from.text_offset);
  }
}
