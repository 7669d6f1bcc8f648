import type { LlamaModel } from '../model/forward/llama-model.js';
import type { LoraCostModel } from '../model/lora/lora-batch.js';
import type { ModelConfig } from '../model/architecture/model-config.js';
import type { TextTokenizer } from '../model/tokenizer/tokenizer.js';
import type { AdapterResidence } from '../pager/adapter-pager.js';
import { AdapterStore, type AdapterRecord } from '../pager/adapter-store.js';
import type { GenerationResult } from './batch-generator.js';
import type { StepInfo } from './continuous-batcher.js';
import { EngineCore } from './engine-core.js';
import { StoreBackedEngine, type StoreBackedEngineOptions } from './store-backed-engine.js';
import type { CompletionRequest, EngineStats, ServingEngine, TokenEvent } from './serving-engine.js';

export interface GatewayOptions extends StoreBackedEngineOptions {
  model: LlamaModel;
  /** Costs of this backend for the LoRA strategy choice; measureLoraCostModel() gives them. */
  loraCost?: LoraCostModel;
  onStep?: (info: StepInfo) => void;
}

/** Stop token ids of a model and its tokenizer, deduplicated. */
export function stopTokenIdsOf(model: ModelConfig, tokenizer: TextTokenizer | undefined): number[] {
  return [...new Set([...model.eosTokenIds, ...(tokenizer?.eosTokenIds ?? [])])];
}

/**
 * The serving side assembled in one thread: adapter store (disk) → EngineCore (pager over one
 * page pool, continuous batcher). The CLI's tools and the tests use it directly; `serve` runs
 * the same EngineCore in a worker thread behind a ThreadedGateway, so HTTP never waits for a step.
 */
export class Gateway extends StoreBackedEngine implements ServingEngine {
  readonly modelId: string;
  readonly model: ModelConfig;
  readonly tokenizer: TextTokenizer | undefined;
  private readonly core: EngineCore;

  private constructor(options: GatewayOptions, store: AdapterStore) {
    super(store);
    this.modelId = options.modelId;
    this.model = options.model.config;
    this.tokenizer = options.tokenizer;
    this.core = new EngineCore({
      model: options.model,
      reader: store.reader(),
      records: store,
      stopTokenIds: stopTokenIdsOf(this.model, options.tokenizer),
      deviceMemoryBytes: options.deviceMemoryBytes,
      hostMemoryBytes: options.hostMemoryBytes,
      limits: options.limits,
      loraStrategy: options.loraStrategy,
      loraCost: options.loraCost,
    });
    if (options.onStep) this.core.onStep(options.onStep);
  }

  static async create(options: GatewayOptions): Promise<Gateway> {
    return new Gateway(options, await AdapterStore.open(options.storeDir, options.model.config, options.maxLoraRank, { keepVersions: options.keepVersions }));
  }

  /** Device pages in the pool (KV + adapters). */
  get poolCapacity(): number {
    return this.core.pool.capacity;
  }

  complete(request: CompletionRequest, onToken?: (event: TokenEvent) => void): Promise<GenerationResult> {
    // the batcher takes the same record, synchronously, when it accepts the request
    const record = request.adapterId === null ? null : this.store.get(request.adapterId);
    return this.track(record, this.core.complete(request, onToken));
  }

  protected retire(id: string, versions: AdapterRecord[]): Promise<void> {
    return this.core.retire(id, versions);
  }

  protected forgetVersions(versions: AdapterRecord[]): void {
    this.core.forgetUnpinned(versions);
  }

  /** Where an adapter's latest version lives now: disk, host, device, or errored. */
  residence(record: AdapterRecord): AdapterResidence {
    return this.core.residence(record);
  }

  loadError(record: AdapterRecord): string | undefined {
    return this.core.loadError(record);
  }

  onStep(listener: (info: StepInfo) => void): void {
    this.core.onStep(listener);
  }

  onAdapterLoad(listener: (seconds: number) => void): void {
    this.core.onAdapterLoad(listener);
  }

  stats(): EngineStats {
    return this.core.stats();
  }

  async close(): Promise<void> {
    this.core.close();
  }
}

