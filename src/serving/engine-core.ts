import * as tf from '@tensorflow/tfjs-core';
import type { LlamaModel } from '../model/forward/llama-model.js';
import type { LoraCostModel, LoraStrategy } from '../model/lora/lora-batch.js';
import { AdapterPager, adapterVersionKey, type AdapterResidence } from '../pager/adapter-pager.js';
import type { AdapterRecord, AdapterStore, StoredAdapterReader } from '../pager/adapter-store.js';
import { PagePool } from '../pager/page-pool.js';
import { pageBytes } from '../pager/page-sizes.js';
import type { GenerationResult } from './batch-generator.js';
import { ContinuousBatcher, type BatcherLimits, type StepInfo } from './continuous-batcher.js';
import type { CompletionRequest, EngineStats, TokenEvent } from './serving-engine.js';

export interface EngineCoreOptions {
  model: LlamaModel;
  /** Reads stored adapter versions (the store itself may live on another thread). */
  reader: StoredAdapterReader;
  /** The latest record of an adapter id. */
  records: Pick<AdapterStore, 'get'>;
  stopTokenIds: number[];
  /** Device page budget for KV cache + adapters, in bytes. */
  deviceMemoryBytes: number;
  hostMemoryBytes: number;
  limits: BatcherLimits;
  loraStrategy?: LoraStrategy;
  /** Costs of this backend for the LoRA strategy choice; measureLoraCostModel() gives them. */
  loraCost?: LoraCostModel;
}

/**
 * The compute side of serving: the model, the page pool, the adapter pager and the continuous
 * batcher. It owns tensors, so it lives on the thread that owns the backend: the Gateway runs
 * it in-process, the ThreadedGateway in its engine worker thread.
 */
export class EngineCore {
  readonly pool: PagePool;
  readonly pager: AdapterPager;
  private readonly batcher: ContinuousBatcher;
  private readonly llama: LlamaModel;
  private readonly stepListeners: ((info: StepInfo) => void)[] = [];

  constructor(options: EngineCoreOptions) {
    this.llama = options.model;
    const config = options.model.config;
    this.pool = new PagePool(Math.floor(options.deviceMemoryBytes / pageBytes(config)));
    this.pager = new AdapterPager(options.reader, this.pool, config, { hostMemoryBytes: options.hostMemoryBytes });
    this.batcher = new ContinuousBatcher({
      model: options.model,
      store: options.records,
      pager: this.pager,
      pool: this.pool,
      limits: options.limits,
      stopTokenIds: options.stopTokenIds,
      loraStrategy: options.loraStrategy,
      loraCost: options.loraCost,
      onStep: (info) => {
        for (const l of this.stepListeners) l(info);
      },
    });
  }

  complete(request: CompletionRequest, onToken?: (event: TokenEvent) => void): Promise<GenerationResult> {
    return this.batcher.submit(request, onToken);
  }

  /** Waits until no request uses the id, then drops the given versions from host and device. */
  async retire(id: string, versions: AdapterRecord[]): Promise<void> {
    await this.batcher.drain(id);
    for (const r of versions) this.pager.forget(r);
  }

  /** Drops versions removed from disk from host and device; one still pinned (in use) stays until evicted. */
  forgetUnpinned(versions: AdapterRecord[]): void {
    const pinned = new Set(this.pager.deviceResident().filter((e) => e.pins > 0).map((e) => e.key));
    for (const r of versions) if (!pinned.has(adapterVersionKey(r))) this.pager.forget(r);
  }

  residence(record: AdapterRecord): AdapterResidence {
    return this.pager.residence(record);
  }

  loadError(record: AdapterRecord): string | undefined {
    return this.pager.failure(record);
  }

  onStep(listener: (info: StepInfo) => void): void {
    this.stepListeners.push(listener);
  }

  onAdapterLoad(listener: (seconds: number) => void): void {
    this.pager.onDeviceLoad(listener);
  }

  stats(): EngineStats {
    return {
      running: this.batcher.runningCount,
      waiting: this.batcher.waitingCount,
      pages: { kv: this.pool.inUse('kv'), adapter: this.pool.inUse('adapter'), capacity: this.pool.capacity },
      pager: { ...this.pager.counters },
      tensors: tf.memory().numTensors,
    };
  }

  close(): void {
    this.batcher.close();
    this.pager.dispose();
    this.llama.dispose();
  }
}
