import { LRUCache } from 'lru-cache';
import { LoraGatewayError } from '../errors.js';
import type { LoraAdapter } from '../model/lora/lora-adapter.js';
import type { ModelConfig } from '../model/architecture/model-config.js';
import { uploadAdapter, type HostLoraAdapter } from '../model/lora/peft-adapter-reader.js';
import type { AdapterRecord, StoredAdapterReader } from './adapter-store.js';
import type { PagePool } from './page-pool.js';
import { adapterPages } from './page-sizes.js';

/**
 * Where one adapter version is, LoRAX's explicit lifecycle: disk → host → device, back to
 * host or disk when evicted, or 'errored' when reading or uploading it failed (its stored
 * files no longer pass their checks) or its logits came out non-finite. An errored version
 * fails its requests at once, without re-reading, until it is deleted or replaced by a new version.
 */
export type AdapterResidence = 'disk' | 'host' | 'device' | 'errored';

export interface AdapterPagerOptions {
  /** Bound of the host tier in bytes of float32 A/B data. */
  hostMemoryBytes: number;
}

interface DeviceEntry {
  adapter: LoraAdapter;
  pins: number;
  lastUsed: number;
}

export interface PagerCounters {
  hostHits: number;
  hostMisses: number;
  deviceLoads: number;
  deviceEvictions: number;
  hostEvictions: number;
}

export function adapterVersionKey(r: Pick<AdapterRecord, 'id' | 'version'>): string {
  return `${r.id}@${r.version}`;
}

function hostBytes(h: HostLoraAdapter): number {
  return h.modules.reduce((s, m) => s + (m.a.length + m.b.length) * 4, 0);
}

/**
 * Moves adapter versions between disk (the AdapterStore), host memory (an LRU bounded in
 * bytes) and device memory (pages of the shared PagePool). Adapters used by running
 * sequences are pinned; unpinned ones are evicted least-recently-used when pages are
 * needed. All loads and evictions run on one queue, in order, so callers never race a load.
 */
export class AdapterPager {
  private readonly store: StoredAdapterReader;
  private readonly pool: PagePool;
  private readonly model: ModelConfig;
  private readonly host: LRUCache<string, HostLoraAdapter>;
  private readonly device = new Map<string, DeviceEntry>();
  private queue: Promise<unknown> = Promise.resolve();
  private clock = 0;
  private readonly loadListeners: ((seconds: number) => void)[] = [];
  private readonly failures = new Map<string, Error>();
  readonly counters: PagerCounters = { hostHits: 0, hostMisses: 0, deviceLoads: 0, deviceEvictions: 0, hostEvictions: 0 };

  constructor(store: StoredAdapterReader, pool: PagePool, model: ModelConfig, options: AdapterPagerOptions) {
    this.store = store;
    this.pool = pool;
    this.model = model;
    this.host = new LRUCache<string, HostLoraAdapter>({
      maxSize: Math.max(1, options.hostMemoryBytes),
      sizeCalculation: (h) => Math.max(1, hostBytes(h)),
      dispose: (_value, _key, reason) => {
        if (reason === 'evict') this.counters.hostEvictions++;
      },
    });
  }

  residence(record: AdapterRecord): AdapterResidence {
    const key = adapterVersionKey(record);
    if (this.failures.has(key)) return 'errored';
    if (this.device.has(key)) return 'device';
    return this.host.has(key) ? 'host' : 'disk';
  }

  /** Why an errored version failed to load. */
  failure(record: AdapterRecord): string | undefined {
    return this.failures.get(adapterVersionKey(record))?.message;
  }

  /** Pages this version needs on device. */
  pagesFor(host: HostLoraAdapter): number {
    return adapterPages(this.model, host.modules.map((m) => m.spec));
  }

  private enqueue<T>(task: () => Promise<T>): Promise<T> {
    const run = this.queue.then(task, task);
    this.queue = run.catch(() => undefined);
    return run;
  }

  /** Reads a version into the host tier (no device pages); used to prefetch waiting requests' adapters. */
  prefetch(record: AdapterRecord): Promise<HostLoraAdapter> {
    return this.enqueue(() => this.toHost(record));
  }

  private async toHost(record: AdapterRecord): Promise<HostLoraAdapter> {
    const key = adapterVersionKey(record);
    const failed = this.failures.get(key);
    if (failed) throw failed;
    const cached = this.host.get(key);
    if (cached) {
      this.counters.hostHits++;
      return cached;
    }
    this.counters.hostMisses++;
    try {
      const h = await this.store.readHost(record);
      this.host.set(key, h);
      return h;
    } catch (err) {
      // a version whose files fail validation stays failed; an I/O error may pass, so it is retried next time
      if (err instanceof LoraGatewayError) this.failures.set(key, err);
      throw err;
    }
  }

  /**
   * Makes a version resident on device and pins it, evicting unpinned adapters LRU if pages
   * are short. Resolves to undefined when it cannot fit even after evicting everything
   * unpinned (the caller retries once pinned adapters or KV pages are released).
   */
  acquire(record: AdapterRecord): Promise<LoraAdapter | undefined> {
    const key = adapterVersionKey(record);
    // a version marked errored while resident (its output was not finite) is not handed out again
    const failed = this.failures.get(key);
    if (failed) return Promise.reject(failed);
    const resident = this.device.get(key);
    if (resident) {
      resident.pins++;
      resident.lastUsed = ++this.clock;
      return Promise.resolve(resident.adapter);
    }
    return this.enqueue(async () => {
      const again = this.device.get(key);
      if (again) {
        again.pins++;
        again.lastUsed = ++this.clock;
        return again.adapter;
      }
      const started = performance.now();
      const h = await this.toHost(record);
      const pages = this.pagesFor(h);
      while (!this.pool.reserve(`adapter:${key}`, 'adapter', pages)) {
        if (!this.evictOne()) return undefined;
      }
      let adapter: LoraAdapter;
      try {
        adapter = uploadAdapter(h, this.model);
      } catch (err) {
        this.pool.release(`adapter:${key}`);
        throw err;
      }
      this.device.set(key, { adapter, pins: 1, lastUsed: ++this.clock });
      this.counters.deviceLoads++;
      for (const l of this.loadListeners) l((performance.now() - started) / 1000);
      return adapter;
    });
  }

  /**
   * Marks a version errored from outside the load path (serving found its logits not finite):
   * its later requests fail with `err` at once, until it is forgotten or replaced.
   */
  markErrored(record: AdapterRecord, err: Error): void {
    const key = adapterVersionKey(record);
    if (!this.failures.has(key)) this.failures.set(key, err);
  }

  /** Called with the seconds each device load took (disk or host read + upload). */
  onDeviceLoad(listener: (seconds: number) => void): void {
    this.loadListeners.push(listener);
  }

  release(record: AdapterRecord): void {
    const e = this.device.get(adapterVersionKey(record));
    if (e && e.pins > 0) e.pins--;
  }

  /** Evicts the least-recently-used unpinned device adapter; false when none is unpinned. */
  evictOne(): boolean {
    let victim: [string, DeviceEntry] | undefined;
    for (const entry of this.device) {
      if (entry[1].pins === 0 && (!victim || entry[1].lastUsed < victim[1].lastUsed)) victim = entry;
    }
    if (!victim) return false;
    this.device.delete(victim[0]);
    victim[1].adapter.dispose();
    this.pool.release(`adapter:${victim[0]}`);
    this.counters.deviceEvictions++;
    return true;
  }

  /** Drops a version from every tier (it must be unpinned), e.g. after delete. */
  forget(record: AdapterRecord): void {
    const key = adapterVersionKey(record);
    const e = this.device.get(key);
    if (e) {
      this.device.delete(key);
      e.adapter.dispose();
      this.pool.release(`adapter:${key}`);
    }
    this.host.delete(key);
    this.failures.delete(key);
  }

  /** Every version not on disk only, with where it is (and why, when errored): for another thread's view. */
  residences(): { key: string; residence: AdapterResidence; error?: string }[] {
    const out: { key: string; residence: AdapterResidence; error?: string }[] = [];
    for (const [key, err] of this.failures) out.push({ key, residence: 'errored', error: err.message });
    for (const key of this.device.keys()) if (!this.failures.has(key)) out.push({ key, residence: 'device' });
    for (const key of this.host.keys()) if (!this.failures.has(key) && !this.device.has(key)) out.push({ key, residence: 'host' });
    return out;
  }

  deviceResident(): { key: string; pins: number }[] {
    return [...this.device].map(([key, e]) => ({ key, pins: e.pins }));
  }

  dispose(): void {
    for (const [key, e] of this.device) {
      e.adapter.dispose();
      this.pool.release(`adapter:${key}`);
    }
    this.device.clear();
    this.host.clear();
  }
}
