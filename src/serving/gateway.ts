import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { AdapterError } from '../errors.js';
import type { LlamaModel } from '../model/forward/llama-model.js';
import type { LoraCostModel, LoraStrategy } from '../model/lora/lora-batch.js';
import type { ModelConfig } from '../model/architecture/model-config.js';
import type { TextTokenizer } from '../model/tokenizer/tokenizer.js';
import { AdapterPager, type AdapterResidence } from '../pager/adapter-pager.js';
import { AdapterStore, type AdapterFiles, type AdapterRecord, type PutOptions } from '../pager/adapter-store.js';
import { PagePool } from '../pager/page-pool.js';
import { pageBytes } from '../pager/page-sizes.js';
import type { GenerationResult } from './batch-generator.js';
import { ContinuousBatcher, type BatcherLimits, type StepInfo } from './continuous-batcher.js';
import type { CompletionRequest, EngineStats, ServingEngine, TokenEvent } from './serving-engine.js';

export interface GatewayOptions {
  modelId: string;
  model: LlamaModel;
  tokenizer: TextTokenizer | undefined;
  /** Where uploaded and registered adapters are stored. */
  storeDir: string;
  /** Device page budget for KV cache + adapters, in bytes. */
  deviceMemoryBytes: number;
  hostMemoryBytes: number;
  maxLoraRank: number;
  limits: BatcherLimits;
  loraStrategy?: LoraStrategy;
  /** Costs of this backend for the LoRA strategy choice; measureLoraCostModel() gives them. */
  loraCost?: LoraCostModel;
  onStep?: (info: StepInfo) => void;
}

/**
 * The serving side assembled: adapter store (disk) → pager (host/device tiers over one page
 * pool) → continuous batcher. This is the ServingEngine the HTTP API talks to.
 */
export class Gateway implements ServingEngine {
  readonly modelId: string;
  readonly model: ModelConfig;
  readonly tokenizer: TextTokenizer | undefined;
  readonly pool: PagePool;
  readonly pager: AdapterPager;
  private readonly store: AdapterStore;
  private readonly batcher: ContinuousBatcher;
  private readonly llama: LlamaModel;
  private readonly stepListeners: ((info: StepInfo) => void)[] = [];

  private constructor(options: GatewayOptions, store: AdapterStore) {
    this.modelId = options.modelId;
    this.llama = options.model;
    this.model = options.model.config;
    this.tokenizer = options.tokenizer;
    this.store = store;
    this.pool = new PagePool(Math.floor(options.deviceMemoryBytes / pageBytes(this.model)));
    this.pager = new AdapterPager(store, this.pool, this.model, { hostMemoryBytes: options.hostMemoryBytes });
    const stopTokenIds = [...new Set([...this.model.eosTokenIds, ...(options.tokenizer?.eosTokenIds ?? [])])];
    this.batcher = new ContinuousBatcher({
      model: options.model,
      store,
      pager: this.pager,
      pool: this.pool,
      limits: options.limits,
      stopTokenIds,
      loraStrategy: options.loraStrategy,
      loraCost: options.loraCost,
      onStep: (info) => {
        options.onStep?.(info);
        for (const l of this.stepListeners) l(info);
      },
    });
  }

  static async create(options: GatewayOptions): Promise<Gateway> {
    return new Gateway(options, await AdapterStore.open(options.storeDir, options.model.config, options.maxLoraRank));
  }

  get runningCount(): number {
    return this.batcher.runningCount;
  }

  get waitingCount(): number {
    return this.batcher.waitingCount;
  }

  complete(request: CompletionRequest, onToken?: (event: TokenEvent) => void): Promise<GenerationResult> {
    return this.batcher.submit(request, onToken);
  }

  listAdapters(): AdapterRecord[] {
    return this.store.list();
  }

  getAdapter(id: string): AdapterRecord | undefined {
    return this.store.get(id);
  }

  putAdapter(id: string, files: AdapterFiles, options?: PutOptions): Promise<AdapterRecord> {
    return this.store.put(id, files, options);
  }

  getAdapterVersion(id: string, version?: number): Promise<AdapterRecord | undefined> {
    return this.store.readVersion(id, version);
  }

  readAdapterFiles(record: AdapterRecord): Promise<AdapterFiles> {
    return this.store.readFiles(record);
  }

  findAdapterVersion(id: string, predicate: (record: AdapterRecord) => boolean): Promise<AdapterRecord | undefined> {
    return this.store.findVersion(id, predicate);
  }

  async loadAdapterFromDir(id: string, dir: string): Promise<AdapterRecord> {
    let files: AdapterFiles;
    try {
      files = {
        config: await readFile(join(dir, 'adapter_config.json')),
        weights: await readFile(join(dir, 'adapter_model.safetensors')),
      };
    } catch (err) {
      throw new AdapterError('ADAPTER_CONFIG_INVALID', `${dir}: cannot read adapter_config.json and adapter_model.safetensors`, { cause: err });
    }
    return this.store.put(id, files);
  }

  async deleteAdapter(id: string): Promise<AdapterRecord> {
    const record = this.store.get(id);
    if (!record) throw new AdapterError('ADAPTER_NOT_FOUND', `adapter '${id}' does not exist`);
    await this.batcher.drain(id);
    for (let v = 1; v <= record.version; v++) this.pager.forget({ ...record, version: v });
    return this.store.delete(id);
  }

  /** Where an adapter's latest version lives now: disk, host, device, or errored. */
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
    };
  }

  async close(): Promise<void> {
    this.batcher.close();
    this.pager.dispose();
    this.llama.dispose();
  }
}
