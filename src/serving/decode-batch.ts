import type * as tf from '@tensorflow/tfjs-core';
import { DecodeBatchCache, type SequenceKvCache } from '../model/forward/kv-cache.js';
import type { LoraAdapter } from '../model/lora/lora-adapter.js';
import { forwardDecode, type ForwardOptions, type LlamaModel } from '../model/forward/llama-model.js';

/**
 * The running sequences' KV caches packed into one DecodeBatchCache, with the sequence that
 * owns each row, so the scheduler can add, drop and decode sequences without tracking rows.
 */
export class DecodeBatch<S> {
  private cache: DecodeBatchCache | undefined;
  private rows: S[] = [];
  private readonly slidingWindow: number | undefined;

  constructor(slidingWindow: number | undefined) {
    this.slidingWindow = slidingWindow;
  }

  get sequences(): readonly S[] {
    return this.rows;
  }

  /**
   * Makes the batch hold exactly `live`, in order. Sequences already in it keep their rows
   * (repacked layer by layer); the others bring the cache of their prefill, which the batch
   * takes over and disposes.
   */
  set(live: S[], prefilled: Map<S, SequenceKvCache>): void {
    const rowOf = new Map(this.rows.map((s, row) => [s, row]));
    const previous = this.cache;
    this.cache = undefined;
    try {
      if (live.length > 0) {
        this.cache = DecodeBatchCache.repack(
          previous,
          live.map((s) => {
            const cache = prefilled.get(s);
            return cache ? { cache } : { row: rowOf.get(s)! };
          }),
          this.slidingWindow,
        );
      }
    } finally {
      previous?.dispose();
      for (const c of prefilled.values()) c.dispose();
    }
    this.rows = [...live];
  }

  /** Drops the rows of sequences that fail `keep` (finished, cancelled or preempted). */
  retain(keep: (s: S) => boolean): void {
    const idx = this.rows.flatMap((s, i) => (keep(s) ? [i] : []));
    if (idx.length === this.rows.length) return;
    if (idx.length === 0) {
      this.dispose();
      return;
    }
    this.cache!.keepRows(idx);
    this.rows = idx.map((i) => this.rows[i]);
  }

  /** One decode step, row b feeding tokens[b] with adapters[b]; logits [rows, vocab]. */
  decode(model: LlamaModel, tokens: number[], adapters: (LoraAdapter | null)[], options: ForwardOptions): tf.Tensor2D {
    return forwardDecode(model, this.cache!, tokens, adapters, options);
  }

  dispose(): void {
    this.cache?.dispose();
    this.cache = undefined;
    this.rows = [];
  }
}
