// Loading a model: resolve the argument, read its description, build the tokenizer.
import { readGguf } from "./gguf.ts";
import { specFromGguf, specFromHfFolder, type ModelSpec } from "./config.ts";
import { resolveModel, type ModelSource } from "./resolve.ts";
import { tokenizerFromGguf, tokenizerFromHfFolder, type ModelTokenizer } from "./tokenizer.ts";
import { dummyModel } from "./dummy.ts";

export interface LoadedModel {
  source: ModelSource;
  spec: ModelSpec;
  tokenizer: ModelTokenizer;
}

/** auto: the model's files; dummy: its shape alone (random weights, made by the CUDA backend). */
export type LoadFormat = "auto" | "dummy";

export async function loadModel(arg: string, loadFormat: LoadFormat = "auto"): Promise<LoadedModel> {
  if (loadFormat === "dummy") return dummyModel(arg);
  const source = await resolveModel(arg);
  if (source.kind === "gguf") {
    const gguf = readGguf(source.path);
    return { source, spec: specFromGguf(gguf), tokenizer: tokenizerFromGguf(gguf) };
  }
  return { source, spec: specFromHfFolder(source.dir), tokenizer: tokenizerFromHfFolder(source.dir) };
}
