import { Worker } from 'node:worker_threads';
import { AdapterError, errorFromWire, LoraGatewayError } from '../errors.js';
import type { BackendChoice, ResolvedBackend } from '../model/backend/backend.js';
import { prepareOpenBlasEnvironment } from '../model/backend/native-matmul.js';
import type { ModelConfig } from '../model/architecture/model-config.js';
import type { TextTokenizer } from '../model/tokenizer/tokenizer.js';
import { adapterVersionKey, type AdapterResidence } from '../pager/adapter-pager.js';
import { AdapterStore, type AdapterRecord } from '../pager/adapter-store.js';
import type { GenerationResult } from './batch-generator.js';
import { queueFullError, type StepInfo } from './batcher-options.js';
import type { EngineWorkerInit, FromEngine, ResidenceView, ToEngine } from './engine-protocol.js';
import { stopTokenIdsOf } from './gateway.js';
import { StoreBackedEngine, type StoreBackedEngineOptions } from './store-backed-engine.js';
import type { CompletionRequest, EngineStats, ServingEngine, TokenEvent } from './serving-engine.js';

export interface ThreadedGatewayOptions extends StoreBackedEngineOptions {
  modelDir: string;
  /** The model's config.json, read on this thread (the weights load on the engine thread). */
  model: ModelConfig;
  backend: BackendChoice;
  /** Startup lines of the engine thread (backend, kernels, cost model). */
  log?: (line: string) => void;
}

interface Pending {
  resolve: (r: GenerationResult) => void;
  reject: (e: unknown) => void;
  onToken?: (e: TokenEvent) => void;
  detach?: () => void;
}

const WORKER = new URL(`./engine-worker${import.meta.url.endsWith('.ts') ? '.ts' : '.js'}`, import.meta.url);

/**
 * The ServingEngine with its compute on a worker thread. The engine thread owns the backend,
 * the model, the pager and the continuous batcher (an EngineCore) and runs steps back to back;
 * this thread keeps HTTP, tokenization and the adapter store, so requests are parsed and
 * queued while a step runs and the batcher admits them at the next step boundary. Streams get
 * each token as a message the moment it is sampled. Adapter records, residences and stats
 * that the API reads synchronously are this thread's copies, refreshed by the engine's messages.
 */
export class ThreadedGateway extends StoreBackedEngine implements ServingEngine {
  readonly modelId: string;
  readonly model: ModelConfig;
  readonly tokenizer: TextTokenizer | undefined;
  poolCapacity = 0;
  /** The backend the engine thread resolved (this thread has none of its own). */
  backend: ResolvedBackend | undefined;
  private readonly worker: Worker;
  private readonly pending = new Map<number, Pending>();
  private readonly retiring = new Map<number, () => void>();
  private nextId = 1;
  /** Requests in flight (running or waiting) past which a new one is refused here, without waiting for a step boundary. */
  private readonly admissionLimit: number;
  private readonly maxWaiting: number;
  private latestStats: EngineStats = { running: 0, waiting: 0, pages: { kv: 0, adapter: 0, capacity: 0 }, pager: { hostHits: 0, hostMisses: 0, deviceLoads: 0, deviceEvictions: 0, hostEvictions: 0 } };
  private residences = new Map<string, { residence: AdapterResidence; error?: string }>();
  private readonly stepListeners: ((info: StepInfo) => void)[] = [];
  private readonly loadListeners: ((seconds: number) => void)[] = [];
  private failure: Error | undefined;
  private closed: Promise<void> | undefined;
  private onClosed: (() => void) | undefined;

  private constructor(options: ThreadedGatewayOptions, store: AdapterStore, worker: Worker) {
    super(store);
    this.modelId = options.modelId;
    this.model = options.model;
    this.tokenizer = options.tokenizer;
    this.worker = worker;
    this.maxWaiting = options.limits.maxWaiting;
    this.admissionLimit = options.limits.maxRunningSeqs + options.limits.maxWaiting;
  }

  /** Opens the store, starts the engine thread and resolves once its model is loaded. */
  static async create(options: ThreadedGatewayOptions): Promise<ThreadedGateway> {
    const store = await AdapterStore.open(options.storeDir, options.model, options.maxLoraRank, { keepVersions: options.keepVersions });
    const init: EngineWorkerInit = {
      modelDir: options.modelDir,
      backend: options.backend,
      storeDir: options.storeDir,
      maxLoraRank: options.maxLoraRank,
      stopTokenIds: stopTokenIdsOf(options.model, options.tokenizer),
      deviceMemoryBytes: options.deviceMemoryBytes,
      hostMemoryBytes: options.hostMemoryBytes,
      limits: options.limits,
      loraStrategy: options.loraStrategy,
    };
    // the engine thread's OpenBLAS reads its core type from the C environment, which only this thread can set
    prepareOpenBlasEnvironment();
    // from source (tests, `node --import tsx`) the worker registers tsx's loader itself first:
    // module hooks do not carry over into worker threads
    const worker = WORKER.pathname.endsWith('.ts')
      ? new Worker(`import('tsx/esm/api').then((m) => { m.register(); return import(${JSON.stringify(WORKER.href)}); })`, { eval: true, workerData: init })
      : new Worker(WORKER, { workerData: init });
    const gateway = new ThreadedGateway(options, store, worker);
    await new Promise<void>((resolve, reject) => {
      worker.on('message', (m: FromEngine) => {
        if (m.type === 'log') options.log?.(m.line);
        else if (m.type === 'ready') {
          gateway.poolCapacity = m.poolCapacity;
          gateway.backend = m.backend;
          gateway.latestStats = m.stats;
          resolve();
        } else if (m.type === 'failed') reject(errorFromWire(m.error));
        else gateway.onMessage(m);
      });
      worker.on('error', (err) => {
        reject(err);
        gateway.fail(err);
      });
      worker.on('exit', (code) => {
        reject(new LoraGatewayError('ENGINE_FAILED', `the engine thread exited (code ${code}) before it was ready`));
        gateway.fail(new LoraGatewayError('ENGINE_FAILED', `the engine thread exited (code ${code})`));
        gateway.onClosed?.();
      });
    }).catch(async (err: unknown) => {
      await worker.terminate();
      throw err;
    });
    return gateway;
  }

  private onMessage(m: FromEngine): void {
    switch (m.type) {
      case 'token':
        this.pending.get(m.id)?.onToken?.(m.event);
        break;
      case 'done':
      case 'error': {
        const p = this.pending.get(m.id);
        if (!p) break;
        this.pending.delete(m.id);
        p.detach?.();
        if (m.type === 'done') p.resolve(m.result);
        else p.reject(errorFromWire(m.error));
        break;
      }
      case 'step':
        this.latestStats = m.stats;
        if (m.residences) this.setResidences(m.residences);
        for (const l of this.stepListeners) l(m.info);
        break;
      case 'state':
        this.latestStats = m.stats;
        this.setResidences(m.residences);
        break;
      case 'adapterLoad':
        for (const l of this.loadListeners) l(m.seconds);
        break;
      case 'retired':
        this.setResidences(m.residences);
        this.retiring.get(m.id)?.();
        this.retiring.delete(m.id);
        break;
      case 'closed':
        this.onClosed?.();
        break;
    }
  }

  private setResidences(view: ResidenceView): void {
    this.residences = new Map(view.map((r) => [r.key, { residence: r.residence, error: r.error }]));
  }

  /** The engine thread died: every request in flight fails, and new ones fail at once. */
  private fail(err: Error): void {
    if (this.failure) return;
    this.failure = err instanceof LoraGatewayError ? err : new LoraGatewayError('ENGINE_FAILED', `the engine thread failed: ${err.message}`);
    for (const p of this.pending.values()) {
      p.detach?.();
      p.reject(this.failure);
    }
    this.pending.clear();
    for (const r of this.retiring.values()) r();
    this.retiring.clear();
  }

  private send(m: ToEngine): void {
    this.worker.postMessage(m);
  }

  complete(request: CompletionRequest, onToken?: (event: TokenEvent) => void): Promise<GenerationResult> {
    if (this.failure) return Promise.reject(this.failure);
    if (this.closed) return Promise.reject(new LoraGatewayError('ENGINE_FAILED', 'the gateway is shutting down'));
    let record: AdapterRecord | null = null;
    if (request.adapterId !== null) {
      record = this.store.get(request.adapterId) ?? null;
      if (!record) return Promise.reject(new AdapterError('ADAPTER_NOT_FOUND', `adapter '${request.adapterId}' does not exist`));
    }
    if (request.signal?.aborted) return Promise.reject(new LoraGatewayError('REQUEST_CANCELLED', 'the request was cancelled'));
    // The engine thread answers only at its next step boundary (a long prefill can take seconds):
    // with every running slot and waiting place taken, the 429 is decided here, at once.
    if (this.pending.size >= this.admissionLimit) {
      return Promise.reject(queueFullError(this.maxWaiting));
    }
    const id = this.nextId++;
    const { signal, ...wire } = request;
    const run = new Promise<GenerationResult>((resolve, reject) => {
      const p: Pending = { resolve, reject, onToken };
      if (signal) {
        const onAbort = () => this.send({ type: 'cancel', id });
        signal.addEventListener('abort', onAbort, { once: true });
        p.detach = () => signal.removeEventListener('abort', onAbort);
      }
      this.pending.set(id, p);
      this.send({ type: 'submit', id, request: wire, record });
    });
    return this.track(record, run);
  }

  protected forgetVersions(versions: AdapterRecord[]): void {
    if (!this.failure && !this.closed) this.send({ type: 'forget', versions });
  }

  protected async retire(adapterId: string, versions: AdapterRecord[]): Promise<void> {
    // a dead engine thread holds nothing to drain or forget
    if (this.failure) return;
    const id = this.nextId++;
    await new Promise<void>((resolve) => {
      this.retiring.set(id, resolve);
      this.send({ type: 'retire', id, adapterId, versions });
    });
  }

  residence(record: AdapterRecord): AdapterResidence {
    return this.residences.get(adapterVersionKey(record))?.residence ?? 'disk';
  }

  loadError(record: AdapterRecord): string | undefined {
    return this.residences.get(adapterVersionKey(record))?.error;
  }

  stats(): EngineStats {
    return this.latestStats;
  }

  onStep(listener: (info: StepInfo) => void): void {
    this.stepListeners.push(listener);
  }

  onAdapterLoad(listener: (seconds: number) => void): void {
    this.loadListeners.push(listener);
  }

  /** Stops the engine thread after it frees its tensors; requests still in flight fail with ENGINE_FAILED. */
  close(): Promise<void> {
    this.closed ??= new Promise<void>((resolve) => {
      if (this.failure) return resolve();
      this.onClosed = resolve;
      this.send({ type: 'close' });
    }).then(async () => {
      this.fail(new LoraGatewayError('ENGINE_FAILED', 'the gateway shut down'));
      await this.worker.terminate();
    });
    return this.closed;
  }
}
