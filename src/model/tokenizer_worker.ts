// The tokenizer on a thread of its own: large prompts and long chats are rendered and
// tokenized here, so that the event loop keeps serving while they are (about 3 µs a
// character for a SentencePiece vocabulary, whose prompt is one BPE word).
import { ModelTokenizer, type TokenizerSource } from "./tokenizer.ts";
import type { TokenizeJob, TokenizeResult } from "./tokenizer_thread.ts";

declare const self: Worker;
let tokenizer: ModelTokenizer | null = null;

self.onmessage = (event: MessageEvent<{ init: TokenizerSource } | TokenizeJob>) => {
  const m = event.data;
  if ("init" in m) {
    tokenizer = new ModelTokenizer(m.init.tokenizerJson, m.init.tokenizerConfig, m.init.chatTemplate);
    return;
  }
  let reply: TokenizeResult;
  try {
    const ids =
      m.kind === "encode"
        ? tokenizer!.encode(m.text, m.addSpecialTokens)
        : tokenizer!.applyChatTemplate(m.messages, m.addGenerationPrompt, m.tools).ids;
    reply = { id: m.id, ids };
  } catch (e) {
    reply = { id: m.id, error: (e as Error).message };
  }
  self.postMessage(reply);
};
