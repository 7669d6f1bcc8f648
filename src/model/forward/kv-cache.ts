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

  /** Frees one layer's tensors (when a batch has taken a copy of them). */
  releaseLayer(l: number): void {
    this.kT[l]?.dispose();
    this.v[l]?.dispose();
    this.kT[l] = null;
    this.v[l] = null;
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
 * Columns allocated for a longest row of `columns` tokens: headroom of max(16, ¼ of it) past
 * it, so most decode steps write in place.
 */
function allocatedFor(columns: number): number {
  return columns + Math.max(16, Math.ceil(columns / 4));
}

/**
 * Writes `src` into `dst`'s memory at the given element offsets, in place, when the backend
 * lets tensors be updated where they lie (wasm: its heap; cpu: the values array). Returns false
 * otherwise, and the caller rebuilds the tensor functionally.
 */
function writeInPlace(dst: tf.Tensor, src: tf.Tensor, write: (to: Float32Array, from: Float32Array) => void): boolean {
  // LORA_GATEWAY_KV_IN_PLACE=off takes the functional path on every backend (a diagnostic, and
  // how the tests reach the path the native TensorFlow backend takes)
  if (/^(off|0|false)$/i.test(process.env.LORA_GATEWAY_KV_IN_PLACE ?? '')) return false;
  const backend = tf.backend() as unknown as {
    typedArrayFromHeap?: (t: tf.TensorInfo) => Float32Array;
    data?: { get(id: object): { values?: Float32Array } };
  };
  if (tf.getBackend() === 'wasm' && backend.typedArrayFromHeap) {
    // both views after every allocation this step made: allocating can move the heap
    write(backend.typedArrayFromHeap(dst), backend.typedArrayFromHeap(src));
    return true;
  }
  if (tf.getBackend() === 'cpu' && backend.data) {
    const to = backend.data.get(dst.dataId).values;
    const from = backend.data.get(src.dataId).values;
    if (!(to instanceof Float32Array) || !(from instanceof Float32Array)) return false;
    write(to, from);
    return true;
  }
  return false;
}

/**
 * The caches of a decode batch packed into one tensor per layer, left-aligned with room to
 * grow: kT [B, kvH, d, cap], v [B, kvH, cap, d], row b's tokens in columns [0, len_b). A decode
 * step writes each row's new key and value into column len_b in place (no copy of the cache
 * per step: a concat per step copied the whole cache and, with sizes growing by one column,
 * fragmented the wasm heap, which never shrinks); when the longest row reaches `cap` the layer
 * is copied once into a larger one. Attention runs over all `cap` columns for every row, the
 * ones a row does not hold masked to −1e30: softmax gives them exactly 0, so they add nothing.
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

  /** Allocated columns per row (the longest row's tokens plus headroom). */
  get capacity(): number {
    return this.kT[0]?.shape[3] ?? 0;
  }

  /** Packs per-sequence caches (which stay owned by the caller) into one batch. */
  static pack(caches: SequenceKvCache[], slidingWindow?: number): DecodeBatchCache {
    return DecodeBatchCache.build(undefined, caches.map((cache) => ({ cache })), slidingWindow, false);
  }

  /**
   * Builds a batch whose rows come from `previous` (by row index) or from per-sequence caches,
   * consuming both layer by layer: each source layer is freed as soon as its copy is in the new
   * batch, so memory peaks at the whole cache plus about two layers, not twice the cache (which
   * is what unpacking every row and packing again would hold).
   */
  static repack(
    previous: DecodeBatchCache | undefined,
    rows: ({ row: number } | { cache: SequenceKvCache })[],
    slidingWindow?: number,
  ): DecodeBatchCache {
    return DecodeBatchCache.build(previous, rows, slidingWindow, true);
  }

  private static build(
    previous: DecodeBatchCache | undefined,
    rows: ({ row: number } | { cache: SequenceKvCache })[],
    slidingWindow: number | undefined,
    consume: boolean,
  ): DecodeBatchCache {
    const lengths = rows.map((r) => ('row' in r ? previous!.lengths[r.row] : r.cache.length));
    const longest = Math.max(...lengths);
    const cap = allocatedFor(longest);
    const numLayers = 'row' in rows[0] ? previous!.kT.length : rows[0].cache.numLayers;
    const kT: tf.Tensor4D[] = [];
    const v: tf.Tensor4D[] = [];
    for (let l = 0; l < numLayers; l++) {
      const [k4, v4] = tf.tidy(() => {
        const ks: tf.Tensor3D[] = [];
        const vs: tf.Tensor3D[] = [];
        rows.forEach((r, i) => {
          const n = lengths[i];
          let k: tf.Tensor3D;
          let val: tf.Tensor3D;
          if ('row' in r) {
            k = tf.squeeze(tf.slice(previous!.kT[l], [r.row, 0, 0, 0], [1, -1, -1, n]), [0]) as tf.Tensor3D;
            val = tf.squeeze(tf.slice(previous!.v[l], [r.row, 0, 0, 0], [1, -1, n, -1]), [0]) as tf.Tensor3D;
          } else {
            const layer = r.cache.layer(l)!;
            k = layer.kT;
            val = layer.v;
          }
          ks.push(tf.pad(k, [[0, 0], [0, 0], [0, cap - n]]));
          vs.push(tf.pad(val, [[0, 0], [0, cap - n], [0, 0]]));
        });
        return [tf.stack(ks) as tf.Tensor4D, tf.stack(vs) as tf.Tensor4D];
      });
      kT.push(k4);
      v.push(v4);
      if (consume) {
        if (previous) {
          previous.kT[l].dispose();
          previous.v[l].dispose();
        }
        for (const r of rows) if ('cache' in r) r.cache.releaseLayer(l);
      }
    }
    if (consume && previous) {
      previous.kT = [];
      previous.v = [];
      previous.lengths = [];
    }
    return new DecodeBatchCache(kT, v, lengths, slidingWindow);
  }

  /**
   * Writes one token per row for one layer (kTNew [B, kvH, d, 1], vNew [B, kvH, 1, d]) into
   * column len_b of row b and returns the layer's whole cache. Called inside the forward's tidy.
   */
  appendColumn(layer: number, kTNew: tf.Tensor4D, vNew: tf.Tensor4D): { kT: tf.Tensor4D; v: tf.Tensor4D } {
    const target = this.stepCapacity();
    if (this.kT[layer].shape[3] < target) this.grow(layer, target);
    const [B, kvH, d, cap] = this.kT[layer].shape;
    const lengths = this.lengths;
    const wroteK = writeInPlace(this.kT[layer], kTNew, (to, from) => {
      // kT[b, h, j, len_b] = kNew[b, h, j]
      for (let bh = 0; bh < B * kvH; bh++) {
        const col = lengths[Math.floor(bh / kvH)];
        for (let j = 0; j < d; j++) to[(bh * d + j) * cap + col] = from[bh * d + j];
      }
    });
    const wroteV = wroteK && writeInPlace(this.v[layer], vNew, (to, from) => {
      // v[b, h, len_b, :] = vNew[b, h, :]
      for (let bh = 0; bh < B * kvH; bh++) {
        const col = lengths[Math.floor(bh / kvH)];
        to.set(from.subarray(bh * d, (bh + 1) * d), (bh * cap + col) * d);
      }
    });
    if (!wroteV) {
      // functional fallback (backends whose tensors cannot be written in place): select the
      // new column per row with a one-hot mask, a copy of the layer per step
      const hot = new Float32Array(B * cap);
      lengths.forEach((n, b) => (hot[b * cap + n] = 1));
      const kHot = tf.tensor4d(hot, [B, 1, 1, cap]);
      const vHot = tf.tensor4d(hot, [B, 1, cap, 1]);
      const kT = tf.keep(tf.add(tf.mul(this.kT[layer], tf.sub(1, kHot)), tf.mul(kTNew, kHot)) as tf.Tensor4D);
      const v = tf.keep(tf.add(tf.mul(this.v[layer], tf.sub(1, vHot)), tf.mul(vNew, vHot)) as tf.Tensor4D);
      this.kT[layer].dispose();
      this.v[layer].dispose();
      this.kT[layer] = kT;
      this.v[layer] = v;
    }
    return { kT: this.kT[layer], v: this.v[layer] };
  }

  /**
   * The capacity every layer has during the step about to append one column: the current one
   * while the longest row still fits, else allocatedFor(longest + 1). Layer 0 grows first, and
   * the other layers then read the grown capacity, so all layers and the mask agree.
   */
  private stepCapacity(): number {
    const needed = Math.max(...this.lengths) + 1;
    return needed > this.capacity ? allocatedFor(needed) : this.capacity;
  }

  /** Copies one layer into a larger allocation of `columns` columns. */
  private grow(layer: number, columns: number): void {
    const extra = columns - this.kT[layer].shape[3];
    const [k, v] = tf.tidy(() => [
      tf.pad(this.kT[layer], [[0, 0], [0, 0], [0, 0], [0, extra]]) as tf.Tensor4D,
      tf.pad(this.v[layer], [[0, 0], [0, 0], [0, extra], [0, 0]]) as tf.Tensor4D,
    ]);
    tf.keep(k);
    tf.keep(v);
    this.kT[layer].dispose();
    this.v[layer].dispose();
    this.kT[layer] = k;
    this.v[layer] = v;
  }

  /** Marks the appended column as present in every layer. */
  commit(): void {
    this.lengths = this.lengths.map((n) => n + 1);
  }

  /**
   * Additive mask [B, 1, 1, cap] for the step about to append one column: row b sees columns
   * [0, len_b + 1), limited to the last `slidingWindow` of them when there is a window. Built
   * for the capacity after this step's growth, which appendColumn applies to every layer.
   */
  stepMask(): tf.Tensor4D {
    const cols = this.stepCapacity();
    const m = new Float32Array(this.rows * cols).fill(MASKED);
    for (let b = 0; b < this.rows; b++) {
      const end = this.lengths[b] + 1;
      const visible = Math.min(end, this.slidingWindow ?? Infinity);
      m.fill(0, b * cols + end - visible, b * cols + end);
    }
    return tf.tensor4d(m, [this.rows, 1, 1, cols]);
  }

  /**
   * Keeps only the given rows (in that order), e.g. when sequences finish; gives back columns
   * when the longest remaining row needs less than half of them.
   */
  keepRows(rows: number[]): void {
    const lengths = rows.map((r) => this.lengths[r]);
    const longest = Math.max(0, ...lengths);
    // read once: `capacity` is layer 0's width, which the loop below changes first
    const before = this.capacity;
    const cap = 2 * allocatedFor(longest) < before ? allocatedFor(longest) : before;
    for (let l = 0; l < this.kT.length; l++) {
      const [k, v] = tf.tidy(() => {
        const idx = tf.tensor1d(rows, 'int32');
        let k = tf.gather(this.kT[l], idx) as tf.Tensor4D;
        let v = tf.gather(this.v[l], idx) as tf.Tensor4D;
        if (cap < before) {
          k = tf.slice(k, [0, 0, 0, 0], [-1, -1, -1, cap]);
          v = tf.slice(v, [0, 0, 0, 0], [-1, -1, cap, -1]);
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

  /** Copies one row back out as a per-sequence cache. */
  unpack(row: number): SequenceKvCache {
    const cache = new SequenceKvCache(this.kT.length);
    const n = this.lengths[row];
    for (let l = 0; l < this.kT.length; l++) {
      const [k, v] = tf.tidy(() => [
        tf.squeeze(tf.slice(this.kT[l], [row, 0, 0, 0], [1, -1, -1, n]), [0]) as tf.Tensor3D,
        tf.squeeze(tf.slice(this.v[l], [row, 0, 0, 0], [1, -1, n, -1]), [0]) as tf.Tensor3D,
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
