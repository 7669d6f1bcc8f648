import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { AdapterError } from '../errors.js';
import type { LoraStrategy } from '../model/lora/lora-batch.js';
import type { TextTokenizer } from '../model/tokenizer/tokenizer.js';
import type { AdapterFiles, AdapterRecord, AdapterStore, PutOptions } from '../pager/adapter-store.js';
import type { BatcherLimits } from './batcher-options.js';

/** What the in-process Gateway and the ThreadedGateway are both configured with. */
export interface StoreBackedEngineOptions {
  modelId: string;
  tokenizer: TextTokenizer | undefined;
  /** Where uploaded and registered adapters are stored. */
  storeDir: string;
  /** Device page budget for KV cache + adapters, in bytes. */
  deviceMemoryBytes: number;
  hostMemoryBytes: number;
  maxLoraRank: number;
  limits: BatcherLimits;
  loraStrategy?: LoraStrategy;
}

/**
 * The adapter-management half of a ServingEngine, over the AdapterStore on this thread: shared
 * by the in-process Gateway and the ThreadedGateway, which differ only in where the engine
 * runs (so in how a deleted adapter's versions leave host and device: `retire`).
 */
export abstract class StoreBackedEngine {
  protected readonly store: AdapterStore;

  protected constructor(store: AdapterStore) {
    this.store = store;
  }

  /** Waits until no request uses the id, then drops the given versions from host and device. */
  protected abstract retire(id: string, versions: AdapterRecord[]): Promise<void>;

  /** The served model's name: `model` with this value means the base model. */
  abstract readonly modelId: string;

  /** An adapter named like the base model could never be reached (`model` picks the base first). */
  private refuseReserved(id: string): void {
    if (id === this.modelId) {
      throw new AdapterError('ADAPTER_ID_RESERVED', `adapter id '${id}' is the served model's name: requests with model '${id}' go to the base model, so such an adapter could never be used`);
    }
  }

  listAdapters(): AdapterRecord[] {
    return this.store.list();
  }

  getAdapter(id: string): AdapterRecord | undefined {
    return this.store.get(id);
  }

  putAdapter(id: string, files: AdapterFiles, options?: PutOptions): Promise<AdapterRecord> {
    this.refuseReserved(id);
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

  /** Registers an adapter folder on disk (vLLM's load_lora_adapter). */
  async loadAdapterFromDir(id: string, dir: string): Promise<AdapterRecord> {
    this.refuseReserved(id);
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

  /** Waits for in-flight requests on the adapter, then removes every version of it. */
  async deleteAdapter(id: string): Promise<AdapterRecord> {
    const record = this.store.get(id);
    if (!record) throw new AdapterError('ADAPTER_NOT_FOUND', `adapter '${id}' does not exist`);
    await this.retire(id, Array.from({ length: record.version }, (_, i) => ({ ...record, version: i + 1 })));
    return this.store.delete(id);
  }
}
