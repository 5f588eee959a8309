/** A model that cannot be loaded: missing, truncated, malformed or unsupported. One line, says what and where. */
export class ModelLoadError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "ModelLoadError";
  }
}
