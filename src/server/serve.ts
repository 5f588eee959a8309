// Placeholder until the HTTP server lands: says so plainly instead of pretending.
export async function serve(_argv: string[]): Promise<number> {
  process.stderr.write("inferneo: `serve` is not available in this build yet; use `inferneo generate`\n");
  return 2;
}
