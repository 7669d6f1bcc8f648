import { AdapterError } from '../errors.js';
import type { AdapterRecord, AdapterFiles, PutOptions } from '../pager/adapter-store.js';
import type { AdapterResidence } from '../pager/adapter-pager.js';
import type { GenerationResult } from '../serving/batch-generator.js';
import type { CompletionRequest, ServingEngine, TokenEvent } from '../serving/serving-engine.js';
import { refuseReservedAdapterId } from '../serving/store-backed-engine.js';
import { qualifyAdapterId, splitAdapterId, TENANT_SEPARATOR } from '../tenants/tenant-ids.js';

/**
 * One tenant's view of the engine. The tenant names its adapters plainly (`support-bot`); the
 * store holds them as `<tenant>~support-bot`. Everything another tenant owns, and every plain
 * (unowned) adapter, is invisible: lookups answer exactly as for an id that does not exist, so
 * the view never tells a tenant which ids others use. The base model is shared.
 *
 * Routes take this view instead of the engine itself, so no route can forget the check.
 */
export class TenantEngineView implements ServingEngine {
  constructor(
    private readonly engine: ServingEngine,
    private readonly tenant: string,
  ) {}

  get modelId(): string {
    return this.engine.modelId;
  }

  get model() {
    return this.engine.model;
  }

  get tokenizer() {
    return this.engine.tokenizer;
  }

  /** The store id of the tenant's `id`; `~` is refused so a tenant cannot name a qualified id. */
  private inner(id: string): string {
    if (id.includes(TENANT_SEPARATOR)) {
      throw new AdapterError('ADAPTER_ID_INVALID', `adapter id ${JSON.stringify(id)} is invalid: '${TENANT_SEPARATOR}' is reserved`);
    }
    return qualifyAdapterId(this.tenant, id);
  }

  private owns(record: AdapterRecord): boolean {
    return splitAdapterId(record.id).tenant === this.tenant;
  }

  /** The record as the tenant sees it: its own id, no owner prefix. */
  private outer(record: AdapterRecord): AdapterRecord {
    return { ...record, id: splitAdapterId(record.id).name };
  }

  /** Back from an outer record (the routes hand records back for residence and file reads). */
  private innerRecord(record: AdapterRecord): AdapterRecord {
    return { ...record, id: this.inner(record.id) };
  }

  /** Engine errors name store ids: the tenant reads its own names, as it sent them. */
  private async unqualified<T>(run: () => Promise<T>): Promise<T> {
    try {
      return await run();
    } catch (err) {
      if (err instanceof Error) err.message = err.message.split(qualifyAdapterId(this.tenant, '')).join('');
      throw err;
    }
  }

  private notFound(id: string): AdapterError {
    return new AdapterError('ADAPTER_NOT_FOUND', `adapter '${id}' does not exist`);
  }

  complete(request: CompletionRequest, onToken?: (event: TokenEvent) => void): Promise<GenerationResult> {
    const adapterId = request.adapterId === null ? null : this.inner(request.adapterId);
    return this.unqualified(() => this.engine.complete({ ...request, adapterId }, onToken));
  }

  listAdapters(): AdapterRecord[] {
    return this.engine
      .listAdapters()
      .filter((r) => this.owns(r))
      .map((r) => this.outer(r));
  }

  getAdapter(id: string): AdapterRecord | undefined {
    if (id.includes(TENANT_SEPARATOR)) return undefined;
    const r = this.engine.getAdapter(this.inner(id));
    return r && this.outer(r);
  }

  async putAdapter(id: string, files: AdapterFiles, options?: PutOptions): Promise<AdapterRecord> {
    refuseReservedAdapterId(id, this.engine.modelId);
    return this.outer(await this.unqualified(() => this.engine.putAdapter(this.inner(id), files, options)));
  }

  async getAdapterVersion(id: string, version?: number): Promise<AdapterRecord | undefined> {
    if (id.includes(TENANT_SEPARATOR)) return undefined;
    const r = await this.engine.getAdapterVersion(this.inner(id), version);
    return r && this.outer(r);
  }

  readAdapterFiles(record: AdapterRecord): Promise<AdapterFiles> {
    return this.unqualified(() => this.engine.readAdapterFiles(this.innerRecord(record)));
  }

  async findAdapterVersion(id: string, predicate: (record: AdapterRecord) => boolean): Promise<AdapterRecord | undefined> {
    const r = await this.engine.findAdapterVersion(this.inner(id), (inner) => predicate(this.outer(inner)));
    return r && this.outer(r);
  }

  async deleteAdapter(id: string): Promise<AdapterRecord> {
    if (id.includes(TENANT_SEPARATOR)) throw this.notFound(id);
    return this.outer(await this.unqualified(() => this.engine.deleteAdapter(this.inner(id))));
  }

  async loadAdapterFromDir(id: string, dir: string): Promise<AdapterRecord> {
    refuseReservedAdapterId(id, this.engine.modelId);
    return this.outer(await this.unqualified(() => this.engine.loadAdapterFromDir(this.inner(id), dir)));
  }

  residence(record: AdapterRecord): AdapterResidence {
    return this.engine.residence(this.innerRecord(record));
  }

  loadError(record: AdapterRecord): string | undefined {
    return this.engine.loadError(this.innerRecord(record));
  }

  stats() {
    return this.engine.stats();
  }

  onStep(listener: Parameters<ServingEngine['onStep']>[0]): void {
    this.engine.onStep(listener);
  }

  onAdapterLoad(listener: (seconds: number) => void): void {
    this.engine.onAdapterLoad(listener);
  }

  /** The view owns nothing: closing the server closes the engine, not a tenant's view of it. */
  async close(): Promise<void> {}
}
