import { AdapterError, LoraGatewayError, RequestError } from '../errors.js';
import type { SequenceKvCache } from '../model/forward/kv-cache.js';
import { LoraStackCache } from '../model/lora/lora-stack-cache.js';
import { forwardSequences } from '../model/forward/llama-model.js';
import type { AdapterRecord } from '../pager/adapter-store.js';
import { kvPagesPerToken } from '../pager/page-sizes.js';
import { queueFullError, type BatcherParts } from './batcher-options.js';
import { prefillLogits, readRows, scored, splitPrefillRows, validateRequest, type GenerationResult } from './batch-generator.js';
import { DecodeBatch } from './decode-batch.js';
import { FairQueue } from './fair-queue.js';
import { outputError, prefillOutputErrors } from './output-guard.js';
import { BASE_KEY, prefillTokens, type Sequence } from './sequence.js';
import { TokenSampler } from './sampler.js';
import type { CompletionRequest, TokenEvent } from './serving-engine.js';

export type { BatcherLimits, BatcherParts, StepInfo } from './batcher-options.js';

/**
 * Iteration-level scheduling (Orca / vLLM / S-LoRA): at every step boundary finished and
 * cancelled sequences leave, waiting requests are admitted (fairly across adapters) when their
 * adapter's pages and all the KV pages they may need (prompt + max_tokens) fit the pool's free
 * pages, prompts are prefilled (at most maxBatchTokens per step, so a long prompt goes in over
 * several steps while the others keep decoding), and every sequence whose prompt is in decodes
 * one token with its own adapter. A sequence holds KV pages only for the tokens it has, growing by one token's pages
 * per step, so the pool is over-committed the way vLLM's is: when a step's growth does not
 * fit (after evicting unpinned adapters), the newest running sequence is preempted — its KV
 * freed, its adapter unpinned, and it goes back to the head of its queue; on re-admission it
 * re-prefills its prompt and the tokens it had generated, and carries on (recompute mode).
 */
export class ContinuousBatcher {
  private readonly parts: BatcherParts;
  private readonly waiting = new FairQueue<Sequence>();
  private running: Sequence[] = [];
  private readonly batch: DecodeBatch<Sequence>;
  private readonly stackCache = new LoraStackCache();
  private readonly inFlight = new Map<string, number>();
  private idleWaiters: (() => void)[] = [];
  private pumping = false;
  private nextId = 1;
  private admissions = 0;
  private readonly kvPerToken: number;

  constructor(parts: BatcherParts) {
    this.parts = parts;
    this.kvPerToken = kvPagesPerToken(parts.model.config);
    this.batch = new DecodeBatch(parts.model.config.slidingWindow);
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
      return Promise.reject(queueFullError(limits.maxWaiting));
    }
    if (request.signal?.aborted) return Promise.reject(new LoraGatewayError('REQUEST_CANCELLED', 'the request was cancelled'));
    return new Promise<GenerationResult>((resolve, reject) => {
      const seq: Sequence = {
        id: this.nextId++,
        adapterKey: request.adapterId ?? BASE_KEY,
        request,
        record,
        adapter: null,
        sampler: new TokenSampler(request.sampling),
        result: { promptIds: request.promptIds, tokenIds: [], finishReason: 'length', logprobs: [], ...(request.echo ? { promptLogprobs: [null] } : {}) },
        onToken,
        resolve,
        reject,
        phase: 'waiting',
        prefilled: 0,
        admittedAt: 0,
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
      this.batch.dispose();
    } finally {
      this.pumping = false;
    }
  }

  private async step(): Promise<boolean> {
    const before = this.running.length;
    const ms = { grow: 0, admit: 0, prefill: 0, repack: 0, decode: 0 };
    let t = performance.now();
    const lap = (phase: keyof typeof ms) => {
      const now = performance.now();
      ms[phase] += now - t;
      t = now;
    };
    this.dropCancelled();
    // decoding sequences get their next token's pages before anything new is admitted
    const preempted = this.growRunning();
    lap('grow');
    // this step's prefill budget goes first to prompts already part-way in, then to new requests
    let budget = this.parts.limits.maxBatchTokens;
    const chunks = new Map<Sequence, number>();
    for (const s of this.running) {
      if (s.phase !== 'prefill' || budget <= 0) continue;
      const n = Math.min(prefillTokens(s).length - s.prefilled, budget);
      chunks.set(s, n);
      budget -= n;
    }
    // after a preemption pages are short: admitting now would only preempt again
    const admitted = preempted > 0 ? [] : await this.admit(budget, chunks);
    lap('admit');
    const finished: Sequence[] = [];
    const joining = chunks.size > 0 ? await this.prefill(chunks, finished) : [];
    lap('prefill');
    if (joining.length > 0) this.joinBatch(joining);
    lap('repack');
    if (this.batch.sequences.length > 0) await this.decode(finished);
    lap('decode');
    const prefilled = [...chunks.values()].reduce((a, b) => a + b, 0);
    this.parts.onStep?.({ running: this.running.length, waiting: this.waiting.length, admitted: admitted.length, prefilled, finished: finished.length, preempted, ms });
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
      this.batch.retain((s) => !gone.includes(s));
      for (const s of gone) this.finish(s, new LoraGatewayError('REQUEST_CANCELLED', 'the request was cancelled'));
    }
  }

  /** Admits waiting requests while they fit, giving each its first prefill chunk from `budget`. */
  private async admit(budget: number, chunks: Map<Sequence, number>): Promise<Sequence[]> {
    const { pool, pager, limits } = this.parts;
    const admitted: Sequence[] = [];
    const adapters = new Set(this.running.map((s) => s.adapterKey));
    for (let cand = this.waiting.peek(); cand && budget > 0; cand = this.waiting.peek()) {
      if (this.running.length >= limits.maxRunningSeqs) break;
      if (!adapters.has(cand.adapterKey) && adapters.size >= limits.maxAdaptersPerBatch) break;
      const prefillLen = prefillTokens(cand).length;
      // echo scores every prompt token in one pass, so its prompt is not split; over budget it
      // still runs in a step where nothing else prefills, so it cannot wait forever
      const whole = cand.request.echo === true && cand.result.tokenIds.length === 0;
      if (whole && prefillLen > budget && chunks.size > 0) break;
      const owner = `kv:${cand.id}`;
      const kvPages = this.kvPerToken * (cand.request.promptIds.length + cand.request.maxTokens);
      if (kvPages > pool.capacity) {
        this.waiting.remove(cand);
        this.finish(cand, new RequestError('CONTEXT_LENGTH_EXCEEDED', `the request needs ${kvPages} KV pages, more than the device pool's ${pool.capacity}`));
        continue;
      }
      while (!pool.reserve(owner, 'kv', kvPages)) if (!pager.evictOne()) break;
      if (pool.has(owner) && cand.record) {
        try {
          cand.adapter = (await pager.acquire(cand.record)) ?? null;
        } catch (err) {
          // this version's files fail their checks (the pager marks it errored): only its requests fail
          pool.release(owner);
          this.waiting.remove(cand);
          this.finish(cand, err);
          continue;
        }
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
      // Holding every page it may need was the admission check; from here on it holds pages for
      // its prefill and the column its first decode step adds, then one more token per step.
      pool.release(owner);
      pool.reserve(owner, 'kv', Math.min(kvPages, this.kvPerToken * (prefillLen + 1)));
      cand.admittedAt = ++this.admissions;
      cand.phase = 'prefill';
      cand.prefilled = 0;
      this.waiting.remove(cand);
      this.waiting.charge(cand.adapterKey, prefillLen);
      adapters.add(cand.adapterKey);
      this.running.push(cand);
      admitted.push(cand);
      const n = whole ? prefillLen : Math.min(prefillLen, budget);
      chunks.set(cand, n);
      budget -= n;
    }
    return admitted;
  }

  /**
   * Reserves the next token's KV pages for every running sequence, evicting unpinned adapters
   * and then preempting the newest sequences while they do not fit. Returns how many were preempted.
   */
  private growRunning(): number {
    const { pool, pager } = this.parts;
    let preempted = 0;
    for (;;) {
      const need = this.batch.sequences.length * this.kvPerToken;
      while (pool.free < need && pager.evictOne());
      if (pool.free >= need) break;
      // a lone sequence always fits: admission checked its adapter and all its KV pages together
      const victim = this.running.reduce((a, b) => (b.admittedAt > a.admittedAt ? b : a));
      this.preempt(victim);
      preempted++;
    }
    for (const s of this.batch.sequences) {
      if (!pool.reserve(`kv:${s.id}`, 'kv', this.kvPerToken)) throw new Error('KV page growth failed after the pool was checked: a scheduler bug');
    }
    return preempted;
  }

  /** Frees a running sequence's KV pages and batch row, unpins its adapter, and requeues it first in its adapter's queue. */
  private preempt(s: Sequence): void {
    this.batch.retain((x) => x !== s);
    this.release(s);
    s.phase = 'waiting';
    s.prefilled = 0;
    this.waiting.requeue(s);
  }

  /** Takes a sequence out of the running set: its prefill cache, KV pages and adapter pin go. */
  private release(s: Sequence): void {
    this.running = this.running.filter((x) => x !== s);
    s.cache?.dispose();
    s.cache = undefined;
    this.parts.pool.release(`kv:${s.id}`);
    if (s.record && s.adapter) this.parts.pager.release(s.record);
    s.adapter = null;
  }

  /**
   * Runs this step's prefill chunks in one forward. Sequences whose prefill completes sample
   * their first token (fresh ones) and are returned to join the decode batch, unless that
   * token already ends them.
   */
  private async prefill(chunks: Map<Sequence, number>, finished: Sequence[]): Promise<Sequence[]> {
    const { model, loraStrategy, loraCost } = this.parts;
    const work = [...chunks].map(([s, n]) => {
      const all = prefillTokens(s);
      const completes = s.prefilled + n === all.length;
      // resumed (preempted) sequences rebuild their cache and already hold their next token
      return { s, tokens: all.slice(s.prefilled, s.prefilled + n), completes, scores: completes && s.result.tokenIds.length === 0 };
    });
    for (const w of work) w.s.cache ??= model.newCache();
    const rows = await readRows(
      forwardSequences(
        model,
        work.map((w) => ({ tokens: w.tokens, cache: w.s.cache, adapter: w.s.adapter, logits: w.scores ? prefillLogits(w.s.request) : ('none' as const) })),
        // no stack cache: it holds the decode batch's adapters, which a prefill's set would churn
        { loraStrategy, loraCost },
      ),
    );
    for (const w of work) w.s.prefilled += w.tokens.length;
    const scoring = work.filter((w) => w.scores).map((w) => w.s);
    prefillOutputErrors(scoring, rows, model.config.vocabSize).forEach((err, i) => err && this.failOutput(scoring[i], err));
    const firstRows = splitPrefillRows(
      scoring.map((s) => s.request),
      rows,
      model.config.vocabSize,
      scoring.map((s) => s.result.promptLogprobs),
    );
    const joining: Sequence[] = [];
    for (const w of work.filter((x) => x.completes)) {
      if (w.scores) {
        const first = firstRows[scoring.indexOf(w.s)];
        if (w.s.failure !== undefined || !first || !this.accept(w.s, first)) {
          finished.push(w.s);
          continue;
        }
      }
      joining.push(w.s);
    }
    for (const s of finished) this.complete(s);
    return joining;
  }

  private async decode(finished: Sequence[]): Promise<void> {
    const { model, loraStrategy, loraCost } = this.parts;
    const live = [...this.batch.sequences];
    const V = model.config.vocabSize;
    const tokens = live.map((s) => s.result.tokenIds[s.result.tokenIds.length - 1]);
    const rows = await readRows(this.batch.decode(model, tokens, live.map((s) => s.adapter), { loraStrategy, loraCost, stackCache: this.stackCache }));
    const done = live.filter((s, b) => !this.accept(s, rows.subarray(b * V, (b + 1) * V)));
    for (const s of done) this.complete(s);
    this.batch.retain((s) => !done.includes(s));
    finished.push(...done);
  }

  /** Records a sampled token; returns whether the sequence goes on. */
  private accept(s: Sequence, row: Float32Array): boolean {
    const err = outputError(s.record, row, row.length);
    if (err) return this.failOutput(s, err);
    const token = s.sampler.sample(row);
    const scoredToken = scored(row, token, s.request.logprobs ?? 0);
    s.result.tokenIds.push(token);
    s.result.logprobs.push(scoredToken);
    this.waiting.charge(s.adapterKey, 1);
    try {
      s.onToken?.({ token: scoredToken });
    } catch (err) {
      s.failure = err;
      return false;
    }
    if (!s.request.ignoreEos && this.parts.stopTokenIds.includes(token)) {
      s.result.finishReason = 'stop';
      return false;
    }
    return s.result.tokenIds.length < s.request.maxTokens;
  }

  /** Non-finite logits end the sequence (never sampled) and mark its adapter version errored; returns false. */
  private failOutput(s: Sequence, err: Error): false {
    s.failure = err;
    if (s.record) this.parts.pager.markErrored(s.record, err);
    return false;
  }

  /** Sequences whose prefill completed join the decode batch with their caches. */
  private joinBatch(joining: Sequence[]): void {
    const caches = new Map<Sequence, SequenceKvCache>();
    for (const s of joining) {
      caches.set(s, s.cache!);
      s.cache = undefined;
      s.phase = 'decode';
    }
    this.batch.set([...this.batch.sequences, ...joining], caches);
  }

  private complete(s: Sequence): void {
    this.finish(s, s.failure);
  }

  /** Frees everything a sequence holds and settles its promise. */
  private finish(s: Sequence, err: unknown): void {
    s.detachAbort?.();
    this.release(s);
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
    this.batch.dispose();
    this.stackCache.clear();
  }
}
