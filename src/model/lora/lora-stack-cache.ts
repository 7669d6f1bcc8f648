import * as tf from '@tensorflow/tfjs-core';
import type { LoraAdapter } from './lora-adapter.js';
import type { ProjectionName } from '../architecture/llama-weights.js';

/** One module's LoRA weights of several adapters side by side, in member order. */
export interface LoraStack {
  /** [in, R]: the members' Aᵀ side by side. */
  aCat: tf.Tensor2D;
  /** [R, out]: their Bᵀ stacked. */
  bCat: tf.Tensor2D;
  members: { adapter: LoraAdapter; rank: number; scale: number }[];
}

const bySerial = (a: LoraAdapter, b: LoraAdapter) => a.serial - b.serial;

/** A group of adapters whose weights are stacked together, one stack per module, built on first use. */
export class LoraStackChunk {
  readonly adapters: readonly LoraAdapter[];
  private readonly stacks = new Map<string, LoraStack | null>();

  constructor(adapters: LoraAdapter[]) {
    this.adapters = [...adapters].sort(bySerial);
  }

  /** The stack of this module over the chunk's adapters that adapt it and are still on device. */
  stack(layer: number, proj: ProjectionName): LoraStack | null {
    const key = `${layer}.${proj}`;
    const cached = this.stacks.get(key);
    if (cached !== undefined) return cached;
    const present = this.adapters.flatMap((adapter) => {
      const weights = adapter.isDisposed ? undefined : adapter.module(layer, proj);
      return weights ? [{ adapter, weights }] : [];
    });
    let stack: LoraStack | null = null;
    if (present.length > 0) {
      const weights = present.map((p) => p.weights);
      stack = {
        aCat: tf.keep(weights.length === 1 ? tf.clone(weights[0].aT) : tf.concat(weights.map((w) => w.aT), 1)),
        bCat: tf.keep(weights.length === 1 ? tf.clone(weights[0].bT) : tf.concat(weights.map((w) => w.bT), 0)),
        members: present.map(({ adapter, weights: w }) => ({ adapter, rank: w.rank, scale: w.scale })),
      };
    }
    this.stacks.set(key, stack);
    return stack;
  }

  dispose(): void {
    for (const s of this.stacks.values()) {
      s?.aCat.dispose();
      s?.bCat.dispose();
    }
    this.stacks.clear();
  }
}

/**
 * Stacked LoRA weights kept across decode steps, as a few chunks (like an LSM tree) rather
 * than one stack per adapter set. Under continuous batching the set changes at almost every
 * step (a request joins or finishes), and rebuilding the stacks of every module for the whole
 * set cost ~120 ms per step at 16 adapters here, more than the LoRA math itself. So:
 *  - adapters that join get a new chunk of their own (a small copy);
 *  - adapters that leave stay in their chunk, masked to zero, until no active adapter is left in it;
 *  - when there are more than `maxChunks` chunks, or the departed adapters' ranks outweigh the
 *    active ones', everything is rebuilt as one chunk of the active set.
 * Each chunk costs ~4 small ops per module per step, hence the small bound.
 */
export class LoraStackCache {
  private chunks: LoraStackChunk[] = [];
  private readonly maxChunks: number;

  constructor(options: { maxChunks?: number } = {}) {
    this.maxChunks = options.maxChunks ?? 3;
  }

  /** Chunks that together hold every adapter in `active`; called once per forward step. */
  plan(active: ReadonlySet<LoraAdapter>): readonly LoraStackChunk[] {
    const kept: LoraStackChunk[] = [];
    for (const c of this.chunks) {
      if (c.adapters.some((a) => active.has(a))) kept.push(c);
      else c.dispose();
    }
    const covered = new Set(kept.flatMap((c) => c.adapters));
    const missing = [...active].filter((a) => !covered.has(a));
    if (missing.length > 0) kept.push(new LoraStackChunk(missing));
    let liveRank = 0;
    let deadRank = 0;
    for (const c of kept) {
      for (const a of c.adapters) {
        if (active.has(a)) liveRank += a.rank;
        else deadRank += a.rank;
      }
    }
    if (kept.length > this.maxChunks || deadRank > liveRank) {
      for (const c of kept) c.dispose();
      this.chunks = [new LoraStackChunk([...active])];
    } else {
      this.chunks = kept;
    }
    return this.chunks;
  }

  /** Number of chunks held. */
  get size(): number {
    return this.chunks.length;
  }

  clear(): void {
    for (const c of this.chunks) c.dispose();
    this.chunks = [];
  }
}
