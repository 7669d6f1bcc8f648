import * as tf from '@tensorflow/tfjs-core';

/** Additive mask value for invisible keys; finite so that 0·mask stays finite. */
export const MASKED = -1e30;

/**
 * Keys and values of one sequence, per layer. Keys are stored transposed ([kvHeads, headDim, len])
 * so attention is a plain matMul: on the wasm backend matMul with transposeB is ~12× slower.
 */
export class SequenceKvCache {
  private readonly kT: (tf.Tensor3D | null)[];
  private readonly v: (tf.Tensor3D | null)[];
  /** Tokens whose keys and values every layer holds. */
  length = 0;

  constructor(numLayers: number) {
    this.kT = new Array(numLayers).fill(null);
    this.v = new Array(numLayers).fill(null);
  }

  get numLayers(): number {
    return this.kT.length;
  }

  /**
   * Appends one layer's new keys [kvH, d, n] and values [kvH, n, d] and returns the whole
   * cache of that layer. Called inside the forward's tidy: the results are kept past it and
   * the previous tensors are released here.
   */
  append(layer: number, kTNew: tf.Tensor3D, vNew: tf.Tensor3D): { kT: tf.Tensor3D; v: tf.Tensor3D } {
    const oldK = this.kT[layer];
    const oldV = this.v[layer];
    const kT = tf.keep(oldK ? tf.concat([oldK, kTNew], 2) : tf.clone(kTNew));
    const v = tf.keep(oldV ? tf.concat([oldV, vNew], 1) : tf.clone(vNew));
    oldK?.dispose();
    oldV?.dispose();
    this.kT[layer] = kT;
    this.v[layer] = v;
    return { kT, v };
  }

  /** Marks n appended tokens as present in every layer. */
  commit(n: number): void {
    this.length += n;
  }

  layer(l: number): { kT: tf.Tensor3D; v: tf.Tensor3D } | undefined {
    const kT = this.kT[l];
    const v = this.v[l];
    return kT && v ? { kT, v } : undefined;
  }

  /** Replaces a layer's tensors (taking ownership), used when unpacking a decode batch. */
  set(l: number, kT: tf.Tensor3D, v: tf.Tensor3D): void {
    this.kT[l]?.dispose();
    this.v[l]?.dispose();
    this.kT[l] = kT;
    this.v[l] = v;
  }

  dispose(): void {
    for (let l = 0; l < this.kT.length; l++) {
      this.kT[l]?.dispose();
      this.v[l]?.dispose();
      this.kT[l] = null;
      this.v[l] = null;
    }
    this.length = 0;
  }
}

/**
 * The caches of a decode batch packed into one tensor per layer, right-aligned (left-padded):
 * kT [B, kvH, d, C], v [B, kvH, C, d]. Because every row's newest token sits in the last
 * column, appending one decode step for the whole batch is a single concat per layer, and
 * attention for all rows is one batched matMul. Padding columns are masked out.
 */
export class DecodeBatchCache {
  private kT: tf.Tensor4D[];
  private v: tf.Tensor4D[];
  /** Valid tokens per row. */
  lengths: number[];
  private readonly slidingWindow: number | undefined;

  private constructor(kT: tf.Tensor4D[], v: tf.Tensor4D[], lengths: number[], slidingWindow: number | undefined) {
    this.kT = kT;
    this.v = v;
    this.lengths = lengths;
    this.slidingWindow = slidingWindow;
  }

  get rows(): number {
    return this.lengths.length;
  }

  get columns(): number {
    return this.kT[0]?.shape[3] ?? 0;
  }

  /** Packs per-sequence caches (which stay owned by the caller) into one batch. */
  static pack(caches: SequenceKvCache[], slidingWindow?: number): DecodeBatchCache {
    const numLayers = caches[0].numLayers;
    const cols = Math.max(...caches.map((c) => c.length));
    const kT: tf.Tensor4D[] = [];
    const v: tf.Tensor4D[] = [];
    for (let l = 0; l < numLayers; l++) {
      const [k4, v4] = tf.tidy(() => {
        const ks = caches.map((c) => {
          const layer = c.layer(l)!;
          return tf.pad(layer.kT, [[0, 0], [0, 0], [cols - c.length, 0]]);
        });
        const vs = caches.map((c) => {
          const layer = c.layer(l)!;
          return tf.pad(layer.v, [[0, 0], [cols - c.length, 0], [0, 0]]);
        });
        return [tf.stack(ks) as tf.Tensor4D, tf.stack(vs) as tf.Tensor4D];
      });
      kT.push(k4);
      v.push(v4);
    }
    return new DecodeBatchCache(kT, v, caches.map((c) => c.length), slidingWindow);
  }

  /**
   * Appends one token per row for one layer (kTNew [B, kvH, d, 1], vNew [B, kvH, 1, d]) and
   * returns the layer's whole cache. Called inside the forward's tidy.
   */
  appendColumn(layer: number, kTNew: tf.Tensor4D, vNew: tf.Tensor4D): { kT: tf.Tensor4D; v: tf.Tensor4D } {
    const kT = tf.keep(tf.concat([this.kT[layer], kTNew], 3));
    const v = tf.keep(tf.concat([this.v[layer], vNew], 2));
    this.kT[layer].dispose();
    this.v[layer].dispose();
    this.kT[layer] = kT;
    this.v[layer] = v;
    return { kT, v };
  }

  /** Marks the appended column as present in every layer. */
  commit(): void {
    this.lengths = this.lengths.map((n) => n + 1);
  }

  /**
   * Additive mask [B, 1, 1, C+1] for the step about to append one column: row b sees its own
   * tokens (the rightmost len_b + 1 columns), limited to the sliding window when there is one.
   */
  stepMask(): tf.Tensor4D | null {
    const cols = this.columns + 1;
    const needed = this.lengths.some((n) => n + 1 < cols || (this.slidingWindow !== undefined && n + 1 > this.slidingWindow));
    if (!needed) return null;
    const m = new Float32Array(this.rows * cols).fill(MASKED);
    for (let b = 0; b < this.rows; b++) {
      const visible = Math.min(this.lengths[b] + 1, this.slidingWindow ?? Infinity);
      m.fill(0, b * cols + cols - visible, (b + 1) * cols);
    }
    return tf.tensor4d(m, [this.rows, 1, 1, cols]);
  }

  /** Keeps only the given rows (in that order), e.g. when sequences finish; trims all-padding columns. */
  keepRows(rows: number[]): void {
    const lengths = rows.map((r) => this.lengths[r]);
    const cols = Math.max(0, ...lengths);
    const drop = this.columns - cols;
    for (let l = 0; l < this.kT.length; l++) {
      const [k, v] = tf.tidy(() => {
        const idx = tf.tensor1d(rows, 'int32');
        let k = tf.gather(this.kT[l], idx) as tf.Tensor4D;
        let v = tf.gather(this.v[l], idx) as tf.Tensor4D;
        if (drop > 0) {
          k = tf.slice(k, [0, 0, 0, drop], [-1, -1, -1, -1]);
          v = tf.slice(v, [0, 0, drop, 0], [-1, -1, -1, -1]);
        }
        return [k, v];
      });
      this.kT[l].dispose();
      this.v[l].dispose();
      this.kT[l] = k;
      this.v[l] = v;
    }
    this.lengths = lengths;
  }

  /** Copies one row back out as a per-sequence cache (padding stripped). */
  unpack(row: number): SequenceKvCache {
    const cache = new SequenceKvCache(this.kT.length);
    const n = this.lengths[row];
    const start = this.columns - n;
    for (let l = 0; l < this.kT.length; l++) {
      const [k, v] = tf.tidy(() => [
        tf.squeeze(tf.slice(this.kT[l], [row, 0, 0, start], [1, -1, -1, n]), [0]) as tf.Tensor3D,
        tf.squeeze(tf.slice(this.v[l], [row, 0, start, 0], [1, -1, n, -1]), [0]) as tf.Tensor3D,
      ]);
      cache.set(l, k, v);
    }
    cache.commit(n);
    return cache;
  }

  dispose(): void {
    for (const t of [...this.kT, ...this.v]) t.dispose();
    this.kT = [];
    this.v = [];
    this.lengths = [];
  }
}
