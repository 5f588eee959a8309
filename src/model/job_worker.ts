// A worker thread that answers jobs: each job gets an id, its reply resolves the job's
// promise. The worker starts on the first job and never keeps the process alive; if it
// crashes, what it held is rejected and the next job starts a fresh one. The tokenizer
// thread and the grammar workers are both this.
export class JobWorker<Reply extends { id: number }> {
  private worker: Worker | null = null;
  private nextId = 0;
  private readonly pending = new Map<number, { resolve: (r: Reply) => void; reject: (e: Error) => void }>();

  /**
   * onStart: what a fresh worker is told first (its model, say), before any job.
   * onCrash: an error for each job the crash took, and the owner's reset.
   */
  constructor(
    private readonly url: URL,
    private readonly onCrash: (message: string) => Error,
    private readonly onStart: (worker: Worker) => void = () => {},
    private readonly onReset: () => void = () => {},
  ) {}

  /** Jobs sent and not yet answered. */
  get numPending(): number {
    return this.pending.size;
  }

  get running(): boolean {
    return this.worker !== null;
  }

  post(job: object): Promise<Reply> {
    const worker = this.start();
    const id = this.nextId++;
    return new Promise<Reply>((resolve, reject) => {
      this.pending.set(id, { resolve, reject });
      worker.postMessage({ ...job, id });
    });
  }

  private start(): Worker {
    if (this.worker) return this.worker;
    const worker = new Worker(this.url.href);
    worker.onmessage = (event: MessageEvent<Reply>) => {
      const p = this.pending.get(event.data.id);
      this.pending.delete(event.data.id);
      p?.resolve(event.data);
    };
    worker.onerror = (event) => {
      for (const p of this.pending.values()) p.reject(this.onCrash(event.message));
      this.pending.clear();
      this.worker = null;
      this.onReset();
      worker.terminate();
    };
    worker.unref();
    this.onStart(worker);
    this.worker = worker;
    return worker;
  }

  terminate(): void {
    this.worker?.terminate();
    this.worker = null;
  }
}
