import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { AdapterError } from '../errors.js';
import type { LoraStrategy } from '../model/lora/lora-batch.js';
import type { TextTokenizer } from '../model/tokenizer/tokenizer.js';
import { adapterVersionKey } from '../pager/adapter-pager.js';
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
  /** Versions of each adapter kept on disk (older ones removed once unused). @defaultValue keep all */
  keepVersions?: number;
}

/**
 * An adapter named like the base model could never be reached (`model` picks the base first):
 * refused wherever such a name is given (`field`: how the request names it).
 */
export function refuseReservedAdapterId(id: string, modelId: string, field = 'adapter id'): void {
  if (id === modelId) {
    throw new AdapterError('ADAPTER_ID_RESERVED', `${field} '${id}' is the served model's name: requests with model '${id}' go to the base model, so such an adapter could never be used`);
  }
}

/**
 * The adapter-management half of a ServingEngine, over the AdapterStore on this thread: shared
 * by the in-process Gateway and the ThreadedGateway, which differ only in where the engine
 * runs (so in how a deleted adapter's versions leave host and device: `retire`).
 */
export abstract class StoreBackedEngine {
  protected readonly store: AdapterStore;
  /** Requests running or waiting per adapter version (`id@version`): the versions pruning must spare. */
  private readonly inFlight = new Map<string, number>();

  protected constructor(store: AdapterStore) {
    this.store = store;
  }

  /** Waits until no request uses the id, then drops the given versions from host and device. */
  protected abstract retire(id: string, versions: AdapterRecord[]): Promise<void>;

  /** Drops versions removed from disk from host and device (no request uses them). */
  protected abstract forgetVersions(versions: AdapterRecord[]): void;

  /**
   * Counts `run` as a request on `record`'s version until it settles. When the last request on
   * a version older than the latest ends, the version is pruned (if --keep-versions says so)
   * before the request's result is handed back, so a client that got its answer sees the
   * store as it will stay.
   */
  protected track<T>(record: AdapterRecord | null | undefined, run: Promise<T>): Promise<T> {
    if (!record) return run;
    const key = adapterVersionKey(record);
    this.inFlight.set(key, (this.inFlight.get(key) ?? 0) + 1);
    const settle = async () => {
      const left = (this.inFlight.get(key) ?? 1) - 1;
      if (left > 0) this.inFlight.set(key, left);
      else this.inFlight.delete(key);
      if (left === 0 && record.version < (this.store.get(record.id)?.version ?? 0)) await this.pruneVersions(record.id);
    };
    return run.then(
      async (result) => {
        await settle();
        return result;
      },
      async (err: unknown) => {
        await settle();
        throw err;
      },
    );
  }

  /**
   * Removes the versions of `id` beyond --keep-versions that no request uses. A failure to
   * remove one (an I/O error) must not fail the put or request that triggered it: the next
   * put or finished request tries again.
   */
  private async pruneVersions(id: string): Promise<void> {
    const latest = this.store.get(id);
    if (!latest) return;
    const removed = await this.store.prune(id, (version) => this.inFlight.has(adapterVersionKey({ id, version }))).catch(() => []);
    if (removed.length > 0) this.forgetVersions(removed.map((version) => ({ ...latest, version })));
  }

  /** The served model's name: `model` with this value means the base model. */
  abstract readonly modelId: string;

  private refuseReserved(id: string): void {
    refuseReservedAdapterId(id, this.modelId);
  }

  /** Stores a new version, then prunes what --keep-versions no longer keeps. */
  private async storeVersion(id: string, files: AdapterFiles, options?: PutOptions): Promise<AdapterRecord> {
    const record = await this.store.put(id, files, options);
    await this.pruneVersions(id);
    return record;
  }

  listAdapters(): AdapterRecord[] {
    return this.store.list();
  }

  getAdapter(id: string): AdapterRecord | undefined {
    return this.store.get(id);
  }

  putAdapter(id: string, files: AdapterFiles, options?: PutOptions): Promise<AdapterRecord> {
    this.refuseReserved(id);
    return this.storeVersion(id, files, options);
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
    return this.storeVersion(id, files);
  }

  /** Waits for in-flight requests on the adapter, then removes every version of it. */
  async deleteAdapter(id: string): Promise<AdapterRecord> {
    const record = this.store.get(id);
    if (!record) throw new AdapterError('ADAPTER_NOT_FOUND', `adapter '${id}' does not exist`);
    await this.retire(id, Array.from({ length: record.version }, (_, i) => ({ ...record, version: i + 1 })));
    return this.store.delete(id);
  }
}
