// A request and its lifecycle. The status order is the lifecycle:
// anything past PREEMPTED is finished.
import type { OutputText } from "./output.ts";

export enum RequestStatus {
  WAITING = 0,
  RUNNING = 1,
  PREEMPTED = 2,
  FINISHED_STOPPED = 3,
  FINISHED_LENGTH = 4,
  FINISHED_ABORTED = 5,
  FINISHED_ERROR = 6,
}

export type FinishReason = "stop" | "length" | "abort" | "error";

export function isFinished(status: RequestStatus): boolean {
  return status > RequestStatus.PREEMPTED;
}

export function finishReason(status: RequestStatus): FinishReason | null {
  switch (status) {
    case RequestStatus.FINISHED_STOPPED:
      return "stop";
    case RequestStatus.FINISHED_LENGTH:
      return "length";
    case RequestStatus.FINISHED_ABORTED:
      return "abort";
    case RequestStatus.FINISHED_ERROR:
      return "error";
    default:
      return null;
  }
}

export interface SamplingParams {
  maxTokens: number;
  minTokens: number; // EOS and stop tokens/strings are held off until this many tokens
  temperature: number;
  topP: number;
  topK: number; // 0 = off
  minP: number;
  presencePenalty: number;
  frequencyPenalty: number;
  repetitionPenalty: number;
  logitBias: Record<number, number> | null;
  seed: number | null; // null: a random seed per request
  stop: string[]; // matched on the text; not part of the output
  stopTokenIds: number[];
  ignoreEos: boolean;
  logprobs: number | null; // null: none; k: the sampled token's and k alternatives'
}

export const DEFAULT_SAMPLING: SamplingParams = {
  maxTokens: 16,
  minTokens: 0,
  temperature: 1,
  topP: 1,
  topK: 0,
  minP: 0,
  presencePenalty: 0,
  frequencyPenalty: 0,
  repetitionPenalty: 1,
  logitBias: null,
  seed: null,
  stop: [],
  stopTokenIds: [],
  ignoreEos: false,
  logprobs: null,
};

export interface TokenLogprob {
  tokenId: number;
  logprob: number;
  top: { tokenId: number; logprob: number }[];
}

export class Request {
  status = RequestStatus.WAITING;
  /** Prompt followed by every token generated so far. */
  readonly tokenIds: number[];
  numComputedTokens = 0;
  blockTable: number[] = [];
  /** Chained hashes of the full blocks of tokenIds, as far as computed (prefix caching). */
  readonly blockHashes: bigint[] = [];
  /**
   * Leading blocks of blockTable already offered to the pool's prefix cache. The pool (in
   * the engine) decides what is named: a block whose tokens another block already holds
   * stays unnamed. Only the pool knows which blocks are cached; this is where to resume.
   */
  numOfferedBlocks = 0;
  /** Leading blocks of blockTable given back to the pool behind a sliding window (their entries name a held one). */
  numReleasedBlocks = 0;
  /** Prompt tokens served from the prefix cache at first admission (null until admitted). */
  numCachedPromptTokens: number | null = null;
  readonly arrivalMs = performance.now();
  firstScheduledMs: number | null = null;
  firstTokenMs: number | null = null;
  lastTokenMs: number | null = null;
  numPreemptions = 0;
  /** params.logitBias as the arrays each step copies into the batch (built once). */
  readonly biasIds: Int32Array;
  readonly biasValues: Float32Array;
  /** Structured output: the grammar matcher that says which tokens may come next (null: any). */
  matcher: number | null = null;
  /** The matcher's next mask, asked for as soon as the last token was accepted (null: not yet). */
  nextMask: Promise<Int32Array> | null = null;
  /** A queued step's wait for the mask after the token being drawn now (null: none waits). */
  maskWaiter: ((mask: Promise<Int32Array> | null) => void) | null = null;
  /** Continuation bytes the output owes its last character (structured output's UTF-8 guard). */
  utf8State = 0;

  constructor(
    readonly id: string,
    readonly promptTokenIds: readonly number[],
    readonly params: SamplingParams,
    readonly seed: bigint,
    readonly output: OutputText | null,
    /** The API call this sequence belongs to (its n choices and prompts): the scheduler is fair between groups. */
    readonly groupId: string = id,
  ) {
    this.tokenIds = [...promptTokenIds];
    const bias = Object.entries(params.logitBias ?? {});
    this.biasIds = Int32Array.from(bias, ([id]) => Number(id));
    this.biasValues = Float32Array.from(bias, ([, value]) => value);
  }

  /** Tokens that steps in flight are drawing (async scheduling): counted, not yet in tokenIds. */
  numPendingTokens = 0;

  /** Prompt, generated and pending tokens: what the scheduler computes up to. */
  get numTokens(): number {
    return this.tokenIds.length + this.numPendingTokens;
  }

  /** Whether a token still being drawn is this request's last (max_tokens): nothing more to schedule. */
  get drawingLast(): boolean {
    return this.numPendingTokens > 0 && this.numOutputTokens + this.numPendingTokens >= this.params.maxTokens;
  }

  get numOutputTokens(): number {
    return this.tokenIds.length - this.promptTokenIds.length;
  }

  get outputTokenIds(): number[] {
    return this.tokenIds.slice(this.promptTokenIds.length);
  }
}
