import { AdapterError, LoraGatewayError, RequestError } from '../errors.js';
import { DecodeBatchCache, type SequenceKvCache } from '../model/kv-cache.js';
import type { LoraAdapter } from '../model/lora-adapter.js';
import type { LoraStrategy } from '../model/lora-batch.js';
import { LoraStackCache } from '../model/lora-stack-cache.js';
import { forwardDecode, forwardSequences, type LlamaModel } from '../model/llama-model.js';
import type { AdapterPager } from '../pager/adapter-pager.js';
import type { AdapterRecord, AdapterStore } from '../pager/adapter-store.js';
import type { PagePool } from '../pager/page-pool.js';
import { kvPagesPerToken } from '../pager/page-sizes.js';
import { prefillLogits, readRows, scored, splitPrefillRows, validateRequest, type GenerationResult } from './batch-generator.js';
import { FairQueue } from './fair-queue.js';
import { TokenSampler } from './sampler.js';
import type { CompletionRequest, TokenEvent } from './serving-engine.js';

export interface BatcherLimits {
  maxRunningSeqs: number;
  /** Prompt tokens prefilled in one step (at least one request is always admitted). */
  maxBatchTokens: number;
  maxAdaptersPerBatch: number;
  /** Requests beyond this many waiting are refused with QUEUE_FULL. */
  maxWaiting: number;
}

export interface BatcherParts {
  model: LlamaModel;
  store: AdapterStore;
  pager: AdapterPager;
  pool: PagePool;
  limits: BatcherLimits;
  stopTokenIds: number[];
  loraStrategy?: LoraStrategy;
  /** Called after every step, for metrics and tests. */
  onStep?: (info: StepInfo) => void;
}

export interface StepInfo {
  running: number;
  waiting: number;
  admitted: number;
  finished: number;
  /** Wall time of the step's phases, in milliseconds. */
  ms: { admit: number; prefill: number; repack: number; decode: number };
}

interface Sequence {
  id: number;
  adapterKey: string;
  request: CompletionRequest;
  record: AdapterRecord | null;
  adapter: LoraAdapter | null;
  sampler: TokenSampler;
  result: GenerationResult;
  onToken?: (e: TokenEvent) => void;
  resolve: (r: GenerationResult) => void;
  reject: (e: unknown) => void;
  cache?: SequenceKvCache;
  /** Set when the request's own token callback threw: it ends that request only. */
  callbackError?: unknown;
  detachAbort?: () => void;
}

const BASE = '(base)';

/**
 * Iteration-level scheduling (Orca / vLLM / S-LoRA): at every step boundary finished and
 * cancelled sequences leave, waiting requests are admitted (fairly across adapters) when their
 * adapter's pages and all their KV pages (prompt + max_tokens) fit the shared pool, new ones are
 * prefilled, and every running sequence decodes one token with its own adapter.
 * Because KV pages are reserved in full at admission, decode never runs out of pages, so
 * nothing has to be preempted.
 */
export class ContinuousBatcher {
  private readonly parts: BatcherParts;
  private readonly waiting = new FairQueue<Sequence>();
  private running: Sequence[] = [];
  private batch: DecodeBatchCache | undefined;
  /** The sequence of each row of `batch`, in row order. */
  private batchRows: Sequence[] = [];
  private readonly stackCache = new LoraStackCache();
  private readonly inFlight = new Map<string, number>();
  private idleWaiters: (() => void)[] = [];
  private pumping = false;
  private nextId = 1;
  private readonly kvPerToken: number;

  constructor(parts: BatcherParts) {
    this.parts = parts;
    this.kvPerToken = kvPagesPerToken(parts.model.config);
  }

  get runningCount(): number {
    return this.running.length;
  }

  get waitingCount(): number {
    return this.waiting.length;
  }

  /** Requests (waiting or running) currently using an adapter id. */
  inFlightFor(adapterId: string): number {
    return this.inFlight.get(adapterId) ?? 0;
  }

  submit(request: CompletionRequest, onToken?: (e: TokenEvent) => void): Promise<GenerationResult> {
    const { model, store, pager, limits } = this.parts;
    let record: AdapterRecord | null = null;
    if (request.adapterId !== null) {
      record = store.get(request.adapterId) ?? null;
      if (!record) return Promise.reject(new AdapterError('ADAPTER_NOT_FOUND', `adapter '${request.adapterId}' does not exist`));
    }
    try {
      validateRequest(model, { ...request, adapter: null, stopTokenIds: this.parts.stopTokenIds });
    } catch (err) {
      return Promise.reject(err);
    }
    if (this.waiting.length >= limits.maxWaiting) {
      return Promise.reject(new LoraGatewayError('QUEUE_FULL', `the waiting queue is full (${limits.maxWaiting} requests); retry later`));
    }
    if (request.signal?.aborted) return Promise.reject(new LoraGatewayError('REQUEST_CANCELLED', 'the request was cancelled'));
    return new Promise<GenerationResult>((resolve, reject) => {
      const seq: Sequence = {
        id: this.nextId++,
        adapterKey: request.adapterId ?? BASE,
        request,
        record,
        adapter: null,
        sampler: new TokenSampler(request.sampling),
        result: { promptIds: request.promptIds, tokenIds: [], finishReason: 'length', logprobs: [], ...(request.echo ? { promptLogprobs: [null] } : {}) },
        onToken,
        resolve,
        reject,
      };
      this.inFlight.set(seq.adapterKey, (this.inFlight.get(seq.adapterKey) ?? 0) + 1);
      this.waiting.push(seq);
      // read the adapter into host memory while the current steps run
      if (record) pager.prefetch(record).catch(() => undefined);
      const onAbort = () => void this.pump();
      request.signal?.addEventListener('abort', onAbort, { once: true });
      seq.detachAbort = () => request.signal?.removeEventListener('abort', onAbort);
      void this.pump();
    });
  }

  /** Resolves once no request uses the adapter id. */
  async drain(adapterId: string): Promise<void> {
    while (this.inFlightFor(adapterId) > 0) await new Promise<void>((r) => this.idleWaiters.push(r));
  }

  private async pump(): Promise<void> {
    if (this.pumping) return;
    this.pumping = true;
    try {
      while (this.running.length > 0 || this.waiting.length > 0) {
        const progressed = await this.step();
        // nothing could run (e.g. all waiting requests blocked on pages held by nobody): stop
        // instead of spinning; the next submit or release pumps again
        if (!progressed) break;
        await new Promise((r) => setImmediate(r)); // let HTTP handlers and aborts run between steps
      }
    } catch (err) {
      const queued = this.waiting.items();
      for (const s of queued) this.waiting.remove(s);
      for (const s of [...this.running, ...queued]) this.finish(s, err);
      this.disposeBatch();
    } finally {
      this.pumping = false;
    }
  }

  private async step(): Promise<boolean> {
    const before = this.running.length;
    const ms = { admit: 0, prefill: 0, repack: 0, decode: 0 };
    let t = performance.now();
    const lap = (phase: keyof typeof ms) => {
      const now = performance.now();
      ms[phase] += now - t;
      t = now;
    };
    this.dropCancelled();
    const admitted = await this.admit();
    lap('admit');
    const finished: Sequence[] = [];
    if (admitted.length > 0) await this.prefill(admitted, finished);
    lap('prefill');
    const live = this.running.filter((s) => !finished.includes(s));
    if (finished.length > 0 || admitted.length > 0) this.repack(live);
    lap('repack');
    if (live.length > 0 && this.batch) await this.decode(live, finished);
    lap('decode');
    this.parts.onStep?.({ running: this.running.length, waiting: this.waiting.length, admitted: admitted.length, finished: finished.length, ms });
    return admitted.length > 0 || before > 0 || finished.length > 0;
  }

  private dropCancelled(): void {
    for (const s of this.waiting.items()) {
      if (s.request.signal?.aborted) {
        this.waiting.remove(s);
        this.finish(s, new LoraGatewayError('REQUEST_CANCELLED', 'the request was cancelled'));
      }
    }
    const gone = this.running.filter((s) => s.request.signal?.aborted);
    if (gone.length > 0) {
      this.repack(this.running.filter((s) => !gone.includes(s)));
      for (const s of gone) this.finish(s, new LoraGatewayError('REQUEST_CANCELLED', 'the request was cancelled'));
    }
  }

  private async admit(): Promise<Sequence[]> {
    const { pool, pager, limits } = this.parts;
    const admitted: Sequence[] = [];
    let tokens = 0;
    const adapters = new Set(this.running.map((s) => s.adapterKey));
    for (let cand = this.waiting.peek(); cand; cand = this.waiting.peek()) {
      if (this.running.length + admitted.length >= limits.maxRunningSeqs) break;
      if (!adapters.has(cand.adapterKey) && adapters.size >= limits.maxAdaptersPerBatch) break;
      const promptLen = cand.request.promptIds.length;
      if (admitted.length > 0 && tokens + promptLen > limits.maxBatchTokens) break;
      const owner = `kv:${cand.id}`;
      const kvPages = this.kvPerToken * (promptLen + cand.request.maxTokens);
      if (kvPages > pool.capacity) {
        this.waiting.remove(cand);
        this.finish(cand, new RequestError('CONTEXT_LENGTH_EXCEEDED', `the request needs ${kvPages} KV pages, more than the device pool's ${pool.capacity}`));
        continue;
      }
      while (!pool.reserve(owner, 'kv', kvPages)) if (!pager.evictOne()) break;
      if (pool.has(owner) && cand.record) {
        cand.adapter = (await pager.acquire(cand.record)) ?? null;
        if (!cand.adapter) pool.release(owner);
      }
      if (!pool.has(owner)) {
        // with nothing running every page is free or evictable: this request can never fit
        if (this.running.length === 0 && admitted.length === 0) {
          this.waiting.remove(cand);
          this.finish(cand, new RequestError('CONTEXT_LENGTH_EXCEEDED', `the request's ${kvPages} KV pages and its adapter do not fit the device pool of ${pool.capacity} pages`));
          continue;
        }
        break;
      }
      this.waiting.remove(cand);
      this.waiting.charge(cand.adapterKey, promptLen);
      adapters.add(cand.adapterKey);
      admitted.push(cand);
      tokens += promptLen;
    }
    return admitted;
  }

  private async prefill(admitted: Sequence[], finished: Sequence[]): Promise<void> {
    const { model, loraStrategy } = this.parts;
    for (const s of admitted) s.cache = model.newCache();
    const rows = await readRows(
      forwardSequences(
        model,
        admitted.map((s) => ({ tokens: s.request.promptIds, cache: s.cache, adapter: s.adapter, logits: prefillLogits(s.request) })),
        // no stack cache: it holds the decode batch's adapters, which a prefill's set would churn
        { loraStrategy },
      ),
    );
    const firstRows = splitPrefillRows(
      admitted.map((s) => s.request),
      rows,
      model.config.vocabSize,
      admitted.map((s) => s.result.promptLogprobs),
    );
    admitted.forEach((s, i) => {
      this.running.push(s);
      const first = firstRows[i];
      if (!first || !this.accept(s, first)) finished.push(s);
    });
    for (const s of finished) this.complete(s);
  }

  private async decode(live: Sequence[], finished: Sequence[]): Promise<void> {
    const { model, loraStrategy } = this.parts;
    const V = model.config.vocabSize;
    const tokens = live.map((s) => s.result.tokenIds[s.result.tokenIds.length - 1]);
    const logits = forwardDecode(model, this.batch!, tokens, live.map((s) => s.adapter), { loraStrategy, stackCache: this.stackCache });
    const rows = await readRows(logits);
    const keep: number[] = [];
    live.forEach((s, b) => {
      if (this.accept(s, rows.subarray(b * V, (b + 1) * V))) keep.push(b);
      else finished.push(s);
    });
    if (keep.length < live.length) {
      for (const s of live.filter((_, b) => !keep.includes(b))) this.complete(s);
      if (keep.length > 0) {
        this.batch!.keepRows(keep);
        this.batchRows = keep.map((b) => live[b]);
      } else {
        this.disposeBatch();
      }
    }
  }

  /** Records a sampled token; returns whether the sequence goes on. */
  private accept(s: Sequence, row: Float32Array): boolean {
    const token = s.sampler.sample(row);
    const scoredToken = scored(row, token, s.request.logprobs ?? 0);
    s.result.tokenIds.push(token);
    s.result.logprobs.push(scoredToken);
    this.waiting.charge(s.adapterKey, 1);
    try {
      s.onToken?.({ token: scoredToken });
    } catch (err) {
      s.callbackError = err;
      return false;
    }
    if (!s.request.ignoreEos && this.parts.stopTokenIds.includes(token)) {
      s.result.finishReason = 'stop';
      return false;
    }
    return s.result.tokenIds.length < s.request.maxTokens;
  }

  /**
   * Makes the packed decode batch hold exactly `live`, in order. Rows of sequences that stay
   * are copied back out first; new sequences bring their prefill caches.
   */
  private repack(live: Sequence[]): void {
    if (this.batch) {
      this.batchRows.forEach((s, row) => {
        if (live.includes(s) && !s.cache) s.cache = this.batch!.unpack(row);
      });
      this.disposeBatch();
    }
    this.running = live;
    if (live.length > 0) {
      this.batch = DecodeBatchCache.pack(live.map((s) => s.cache!), this.parts.model.config.slidingWindow);
      this.batchRows = [...live];
    }
    for (const s of live) {
      s.cache?.dispose();
      s.cache = undefined;
    }
  }

  private disposeBatch(): void {
    this.batch?.dispose();
    this.batch = undefined;
    this.batchRows = [];
  }

  private complete(s: Sequence): void {
    this.finish(s, s.callbackError);
  }

  /** Frees everything a sequence holds and settles its promise. */
  private finish(s: Sequence, err: unknown): void {
    s.detachAbort?.();
    this.running = this.running.filter((x) => x !== s);
    s.cache?.dispose();
    s.cache = undefined;
    this.parts.pool.release(`kv:${s.id}`);
    if (s.record && s.adapter) this.parts.pager.release(s.record);
    s.adapter = null;
    const left = (this.inFlight.get(s.adapterKey) ?? 1) - 1;
    if (left > 0) this.inFlight.set(s.adapterKey, left);
    else this.inFlight.delete(s.adapterKey);
    const waiters = this.idleWaiters;
    this.idleWaiters = [];
    for (const w of waiters) w();
    if (err === undefined) s.resolve(s.result);
    else s.reject(err);
  }

  close(): void {
    this.disposeBatch();
    this.stackCache.clear();
  }
}
