/**
 * S-LoRA's Virtual Token Counter, per adapter: the next request admitted is the oldest one of
 * the adapter that has been served the fewest tokens, so one hot adapter cannot starve the
 * rest. An adapter whose queue was empty re-enters at the lowest counter among backlogged
 * adapters, so idle time does not bank credit.
 */
export class FairQueue<T extends { adapterKey: string }> {
  private readonly queues = new Map<string, T[]>();
  private readonly counters = new Map<string, number>();
  private size = 0;

  get length(): number {
    return this.size;
  }

  push(item: T): void {
    this.queueOf(item).push(item);
    this.size++;
  }

  /** Puts an item back at the head of its adapter's queue (a preempted request resumes first). */
  requeue(item: T): void {
    this.queueOf(item).unshift(item);
    this.size++;
  }

  private queueOf(item: T): T[] {
    let q = this.queues.get(item.adapterKey);
    if (!q) {
      const backlogged = [...this.queues.keys()].map((k) => this.counters.get(k) ?? 0);
      const floor = backlogged.length > 0 ? Math.min(...backlogged) : 0;
      this.counters.set(item.adapterKey, Math.max(this.counters.get(item.adapterKey) ?? 0, floor));
      this.queues.set(item.adapterKey, (q = []));
    }
    return q;
  }

  /** The head of the least-served adapter's queue, without removing it. */
  peek(): T | undefined {
    let best: string | undefined;
    for (const k of this.queues.keys()) {
      if (best === undefined || (this.counters.get(k) ?? 0) < (this.counters.get(best) ?? 0)) best = k;
    }
    return best === undefined ? undefined : this.queues.get(best)![0];
  }

  /** Removes an item (the peeked head, or a cancelled request anywhere). */
  remove(item: T): boolean {
    const q = this.queues.get(item.adapterKey);
    const i = q ? q.indexOf(item) : -1;
    if (!q || i < 0) return false;
    q.splice(i, 1);
    if (q.length === 0) this.queues.delete(item.adapterKey);
    this.size--;
    return true;
  }

  /** Charges served tokens to an adapter's counter. */
  charge(adapterKey: string, tokens: number): void {
    this.counters.set(adapterKey, (this.counters.get(adapterKey) ?? 0) + tokens);
  }

  items(): T[] {
    return [...this.queues.values()].flat();
  }
}
