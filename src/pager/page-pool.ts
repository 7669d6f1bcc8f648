import { LoraGatewayError } from '../errors.js';

export type PageKind = 'kv' | 'adapter';

interface Holding {
  kind: PageKind;
  pages: number;
}

/**
 * Exact accounting of the device page budget shared by KV cache and adapter weights.
 * Every page in use belongs to exactly one owner (a running sequence's KV, or a resident
 * adapter version); reservations are all-or-nothing, so `inUse() <= capacity` always holds
 * and a failed reservation changes nothing.
 */
export class PagePool {
  readonly capacity: number;
  private readonly holdings = new Map<string, Holding>();
  private used: Record<PageKind, number> = { kv: 0, adapter: 0 };

  constructor(capacityPages: number) {
    if (!Number.isInteger(capacityPages) || capacityPages < 0) {
      throw new LoraGatewayError('CONFIG_INVALID', `page pool capacity must be a whole number of pages ≥ 0, got ${capacityPages}`);
    }
    this.capacity = capacityPages;
  }

  /** Pages in use, of one kind or in total. */
  inUse(kind?: PageKind): number {
    return kind ? this.used[kind] : this.used.kv + this.used.adapter;
  }

  get free(): number {
    return this.capacity - this.inUse();
  }

  held(owner: string): number {
    return this.holdings.get(owner)?.pages ?? 0;
  }

  has(owner: string): boolean {
    return this.holdings.has(owner);
  }

  /**
   * Adds `pages` to an owner's holding (creating it), or does nothing and returns false when
   * they do not fit. An owner keeps one kind for its lifetime.
   */
  reserve(owner: string, kind: PageKind, pages: number): boolean {
    if (!Number.isInteger(pages) || pages < 0) {
      throw new LoraGatewayError('REQUEST_INVALID', `cannot reserve ${pages} pages for ${owner}`);
    }
    const h = this.holdings.get(owner);
    if (h && h.kind !== kind) {
      throw new LoraGatewayError('REQUEST_INVALID', `${owner} holds ${h.kind} pages, not ${kind}`);
    }
    if (pages > this.free) return false;
    if (h) h.pages += pages;
    else this.holdings.set(owner, { kind, pages });
    this.used[kind] += pages;
    return true;
  }

  /** Returns all of an owner's pages; returns how many were freed (0 for an unknown owner). */
  release(owner: string): number {
    const h = this.holdings.get(owner);
    if (!h) return 0;
    this.holdings.delete(owner);
    this.used[h.kind] -= h.pages;
    return h.pages;
  }

  /** Owners of one kind with their page counts, for eviction decisions and metrics. */
  owners(kind: PageKind): { owner: string; pages: number }[] {
    return [...this.holdings].filter(([, h]) => h.kind === kind).map(([owner, h]) => ({ owner, pages: h.pages }));
  }
}
