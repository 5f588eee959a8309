// Fixed pseudo-random prompts for the benchmarks: BOS, then ids past the special and
// byte tokens (so random-weight models see whole pieces), the same for the same seed.
export function syntheticPrompt(length: number, vocabSize: number, seed: number, bos = 1): number[] {
  let state = seed;
  const ids = [bos];
  while (ids.length < length) {
    state = (state * 1103515245 + 12345) % 2 ** 31;
    ids.push(259 + (state % Math.max(1, vocabSize - 259)));
  }
  return ids;
}
