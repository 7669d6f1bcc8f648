import * as tf from '@tensorflow/tfjs-core';
import type { LoraAdapter, LoraModuleWeights } from './lora-adapter.js';
import type { ProjectionName } from '../architecture/llama-weights.js';
import type { LoraStack, LoraStackCache, LoraStackChunk } from './lora-stack-cache.js';
import { nativeSgmvAvailable, sgmvDelta, type SgmvSegment } from '../backend/native-lora.js';

/** Rows [start, start+count) of the flattened token batch use `adapter` (null: base model only). */
export interface LoraRowSegment {
  start: number;
  count: number;
  adapter: LoraAdapter | null;
}

export type LoraStrategy = 'auto' | 'stacked' | 'segmented';

/**
 * Costs of the wasm backend that decide between strategies, measured on the development
 * machine (see BENCHMARKS.md): ~16 GFLOP/s for matMul, ~20 µs fixed cost per small op,
 * ~4 ns per float for element-wise ops and copies.
 */
export interface LoraCostModel {
  flopsPerSecond: number;
  secondsPerOp: number;
  /** Element-wise ops (slice, multiply, concat) per float touched. */
  secondsPerElement: number;
}

export const WASM_COST_MODEL: LoraCostModel = { flopsPerSecond: 16e9, secondsPerOp: 20e-6, secondsPerElement: 4e-9 };

interface Participant {
  adapter: LoraAdapter;
  weights: LoraModuleWeights;
  rows: number;
}

/**
 * Heterogeneous batched LoRA for one forward step. For x [T, in] and the adapter a(t) of row t:
 *   delta[t] = s_a(t) · (x[t] · A_a(t)ᵀ) · B_a(t)ᵀ,   0 where a(t) is none or does not adapt this module.
 * Two equivalent strategies, chosen per module by a cost model:
 *  - stacked:   (x · [A_1ᵀ … A_nᵀ]) ⊙ M · [B_1ᵀ; …; B_nᵀ], M[t, cols of a] = s_a if a(t) = a else 0.
 *               Few ops, but every row pays for every adapter's rank.
 *  - segmented: per run of rows sharing an adapter, slice, two small matMuls, scale; concat
 *               the runs back in row order. Exact FLOPs, but ~4 ops per run.
 * Deltas belong to the caller's tf.tidy; masks live until dispose(), stacks in the cache.
 */
export class LoraBatch {
  private readonly segments: LoraRowSegment[];
  private readonly totalRows: number;
  private readonly strategy: LoraStrategy;
  private readonly cost: LoraCostModel;
  private readonly masks = new Map<string, tf.Tensor2D>();
  /** Row segments of each adapter in the batch. */
  private readonly rowsOf = new Map<LoraAdapter, LoraRowSegment[]>();
  private readonly chunks: readonly LoraStackChunk[] | undefined;
  /** The path the last delta() took, for benchmarks and diagnostics. */
  lastChoice: 'single' | 'stacked' | 'segmented' | 'native' | undefined;

  constructor(
    segments: LoraRowSegment[],
    totalRows: number,
    options: { strategy?: LoraStrategy; cost?: LoraCostModel; stackCache?: LoraStackCache } = {},
  ) {
    this.segments = segments;
    this.totalRows = totalRows;
    this.strategy = options.strategy ?? 'auto';
    this.cost = options.cost ?? WASM_COST_MODEL;
    for (const seg of segments) {
      if (!seg.adapter || seg.count === 0) continue;
      const list = this.rowsOf.get(seg.adapter);
      if (list) list.push(seg);
      else this.rowsOf.set(seg.adapter, [seg]);
    }
    // planned every step, even when no module takes the stacked path, so that chunks of
    // adapters that have left are freed promptly (stacks inside chunks are built lazily)
    this.chunks = options.stackCache?.plan(new Set(this.rowsOf.keys()));
  }

  dispose(): void {
    for (const m of this.masks.values()) m.dispose();
    this.masks.clear();
  }

  /**
   * y + the LoRA delta for x [T, in] at one projection, y [T, out] being the base projection's
   * output (y itself when no row adapts it). The native kernel adds into its output directly.
   */
  apply(layer: number, proj: ProjectionName, x: tf.Tensor2D, y: tf.Tensor2D): tf.Tensor2D {
    const r = this.compute(layer, proj, x, y);
    if (!r) return y;
    return r.includesBase ? r.tensor : (tf.add(y, r.tensor) as tf.Tensor2D);
  }

  /** The LoRA delta [T, out] for x [T, in] at one projection, or null when no row adapts it. */
  delta(layer: number, proj: ProjectionName, x: tf.Tensor2D): tf.Tensor2D | null {
    return this.compute(layer, proj, x, undefined)?.tensor ?? null;
  }

  /** The delta, or base + delta where the path can form the sum itself (the native kernel). */
  private compute(layer: number, proj: ProjectionName, x: tf.Tensor2D, base: tf.Tensor2D | undefined): { tensor: tf.Tensor2D; includesBase: boolean } | null {
    if (this.rowsOf.size === 0) return null;
    const participants = this.participants(layer, proj);
    if (participants.length === 0) return null;
    const outFeatures = participants[0].weights.bT.shape[1];
    const inFeatures = x.shape[1];
    if (participants.length === 1 && participants[0].rows === this.totalRows) {
      const w = participants[0].weights;
      this.lastChoice = 'single';
      return { tensor: tf.mul(tf.matMul(tf.matMul(x, w.aT), w.bT), w.scale) as tf.Tensor2D, includesBase: false };
    }
    // with the native kernel ('auto' only, and not under a gradient tape: it has no gradient)
    // every adapter's rows are done in one call at exact FLOPs, reading weights in place
    if (this.strategy === 'auto' && nativeSgmvAvailable() && !recordingGradients()) {
      this.lastChoice = 'native';
      return { tensor: this.native(layer, proj, x, outFeatures, base), includesBase: base !== undefined };
    }
    const choice = this.strategy === 'auto' ? this.cheaper(layer, proj, participants, inFeatures, outFeatures) : this.strategy;
    this.lastChoice = choice;
    return { tensor: choice === 'stacked' ? this.stacked(layer, proj, x, participants) : this.segmented(x, layer, proj, outFeatures), includesBase: false };
  }

  /** The batch's adapters that adapt this module, in order of first row, with their row counts. */
  private participants(layer: number, proj: ProjectionName): Participant[] {
    return [...this.rowsOf].flatMap(([adapter, segs]) => {
      const weights = adapter.module(layer, proj);
      return weights ? [{ adapter, weights, rows: segs.reduce((n, s) => n + s.count, 0) }] : [];
    });
  }

  private cheaper(layer: number, proj: ProjectionName, ps: Participant[], inF: number, outF: number): 'stacked' | 'segmented' {
    const { flopsPerSecond: f, secondsPerOp: o, secondsPerElement: e } = this.cost;
    const T = this.totalRows;
    const totalRank = ps.reduce((s, p) => s + p.weights.rank, 0);
    // stacked: every row pays every rank; one mask multiply over [T, R]
    const stacked = (2 * T * totalRank * (inF + outF)) / f + 3 * o + T * totalRank * e;
    // segmented: exact FLOPs, ~4 ops per run of rows, row copies in (slice) and out (scale, concat)
    const runs = this.runs(layer, proj);
    const exactFlops = runs.reduce((s, r) => s + (r.weights ? 2 * r.count * r.weights.rank * (inF + outF) : 0), 0);
    const segmented = exactFlops / f + (4 * runs.length + 1) * o + T * (inF + 2 * outF) * e;
    return stacked <= segmented ? 'stacked' : 'segmented';
  }

  private stacked(layer: number, proj: ProjectionName, x: tf.Tensor2D, ps: Participant[]): tf.Tensor2D {
    let stacks: LoraStack[];
    if (this.chunks) {
      stacks = this.chunks.flatMap((c) => {
        const st = c.stack(layer, proj);
        return st && st.members.some((m) => this.rowsOf.has(m.adapter)) ? [st] : [];
      });
    } else {
      // a one-off stack inside the caller's tidy
      stacks = [
        {
          aCat: tf.concat(ps.map((p) => p.weights.aT), 1),
          bCat: tf.concat(ps.map((p) => p.weights.bT), 0),
          members: ps.map((p) => ({ adapter: p.adapter, rank: p.weights.rank, scale: p.weights.scale })),
        },
      ];
    }
    let sum: tf.Tensor2D | undefined;
    for (const st of stacks) {
      const d = tf.matMul(tf.mul(tf.matMul(x, st.aCat), this.mask(st)) as tf.Tensor2D, st.bCat) as tf.Tensor2D;
      sum = sum ? (tf.add(sum, d) as tf.Tensor2D) : d;
    }
    return sum!;
  }

  /**
   * [T, R] with scale_a in the columns of adapter a on the rows that use a, else 0 (rows of
   * other adapters, of no adapter, or members that have left the batch). Stacks with the same
   * members, ranks and scales share one mask for the whole step.
   */
  private mask(st: LoraStack): tf.Tensor2D {
    const key = st.members.map((m) => `${m.adapter.serial}:${m.rank}:${m.scale}`).join(',');
    let mask = this.masks.get(key);
    if (!mask) {
      const totalRank = st.aCat.shape[1];
      const m = new Float32Array(this.totalRows * totalRank);
      let col = 0;
      for (const member of st.members) {
        for (const seg of this.rowsOf.get(member.adapter) ?? []) {
          for (let t = seg.start; t < seg.start + seg.count; t++) m.fill(member.scale, t * totalRank + col, t * totalRank + col + member.rank);
        }
        col += member.rank;
      }
      // kept past the per-layer tidy: every layer with the same members reuses it
      mask = tf.keep(tf.tensor2d(m, [this.totalRows, totalRank]));
      this.masks.set(key, mask);
    }
    return mask;
  }

  /** Consecutive rows that share one module weight (or none), in row order. */
  private runs(layer: number, proj: ProjectionName): { start: number; count: number; weights: LoraModuleWeights | undefined }[] {
    const runs: { start: number; count: number; weights: LoraModuleWeights | undefined }[] = [];
    for (const seg of this.segments) {
      if (seg.count === 0) continue;
      const weights = seg.adapter?.module(layer, proj);
      const last = runs[runs.length - 1];
      if (last && last.weights === weights && last.start + last.count === seg.start) last.count += seg.count;
      else runs.push({ start: seg.start, count: seg.count, weights });
    }
    return runs;
  }

  private native(layer: number, proj: ProjectionName, x: tf.Tensor2D, outFeatures: number, base: tf.Tensor2D | undefined): tf.Tensor2D {
    const index = new Map<LoraModuleWeights, number>();
    const segments: SgmvSegment[] = [];
    for (const run of this.runs(layer, proj)) {
      if (!run.weights) continue;
      let p = index.get(run.weights);
      if (p === undefined) index.set(run.weights, (p = index.size));
      segments.push({ start: run.start, count: run.count, p });
    }
    const participants = [...index.keys()].map((w) => ({ aT: w.aT, bT: w.bT, rank: w.rank, scale: w.scale }));
    return sgmvDelta(x, participants, segments, outFeatures, base);
  }

  private segmented(x: tf.Tensor2D, layer: number, proj: ProjectionName, outFeatures: number): tf.Tensor2D {
    // Row slices and one concat in row order: tf.gather is avoided because the wasm kernel
    // copies element by element (17 ms for 512×576 here, vs 0.3 ms for a concat).
    const pieces = this.runs(layer, proj).map(({ start, count, weights }) =>
      weights
        ? (tf.mul(tf.matMul(tf.matMul(tf.slice(x, [start, 0], [count, -1]), weights.aT), weights.bT), weights.scale) as tf.Tensor2D)
        : (tf.zeros([count, outFeatures]) as tf.Tensor2D),
    );
    return pieces.length === 1 ? pieces[0] : tf.concat(pieces, 0);
  }
}

/** Whether a gradient tape is recording (tf.grad / variableGrads): kernels without gradients must not run then. */
function recordingGradients(): boolean {
  return ((tf.engine() as unknown as { state: { gradientDepth: number } }).state.gradientDepth ?? 0) > 0;
}
