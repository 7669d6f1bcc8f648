import * as tf from '@tensorflow/tfjs-core';
import { RequestError } from '../../errors.js';
import { DecodeBatchCache, MASKED, SequenceKvCache } from './kv-cache.js';
import type { LoraAdapter } from '../lora/lora-adapter.js';
import { LoraBatch, type LoraCostModel, type LoraRowSegment, type LoraStrategy } from '../lora/lora-batch.js';
import type { LoraStackCache } from '../lora/lora-stack-cache.js';
import { disposeLlamaWeights, type LlamaWeights, type ProjectionName } from '../architecture/llama-weights.js';
import type { ModelConfig } from '../architecture/model-config.js';
import { applyRope, ropeInverseFrequencies, ropeTables } from './rope.js';

/** A Llama-family decoder held as tensors. Weights are read-only; LoRA is applied unmerged. */
export class LlamaModel {
  readonly config: ModelConfig;
  readonly weights: LlamaWeights;
  readonly invFreq: Float64Array;

  constructor(config: ModelConfig, weights: LlamaWeights) {
    this.config = config;
    this.weights = weights;
    this.invFreq = ropeInverseFrequencies(config);
  }

  newCache(): SequenceKvCache {
    return new SequenceKvCache(this.config.numLayers);
  }

  dispose(): void {
    disposeLlamaWeights(this.weights);
  }
}

export interface ForwardOptions {
  loraStrategy?: LoraStrategy;
  /** Backend costs for the stacked/segmented choice (default: WASM_COST_MODEL). */
  loraCost?: LoraCostModel;
  stackCache?: LoraStackCache;
}

/** One sequence's part of a forward step. */
export interface SequenceStep {
  /** Tokens to run now; their positions start at cache.length. */
  tokens: number[];
  /** Absent: attend only among `tokens` (a stateless forward, as in training). */
  cache?: SequenceKvCache;
  adapter: LoraAdapter | null;
  /** Which rows' logits to return: none, the last token's, or every token's (echo / scoring). */
  logits: 'none' | 'last' | 'all';
}

/** Per-layer attention over the layer's projected q [T, H, d], k and v [T, kvH, d]; returns [T, H·d]. */
type Attend = (layer: number, q: tf.Tensor3D, k: tf.Tensor3D, v: tf.Tensor3D) => tf.Tensor2D;

function rmsNorm(x: tf.Tensor2D, weight: tf.Tensor1D, eps: number): tf.Tensor2D {
  const variance = tf.mean(tf.square(x), -1, true);
  return tf.mul(tf.mul(x, tf.rsqrt(tf.add(variance, eps))), weight) as tf.Tensor2D;
}

/**
 * x·Wᵀ (+ bias) (+ LoRA). Each intermediate is freed as soon as the next exists, inside the
 * caller's tidy, so a 2,048-token prefill holds one [T, out] tensor per projection, not three.
 */
function linear(model: LlamaModel, lora: LoraBatch, layer: number, proj: ProjectionName, x: tf.Tensor2D): tf.Tensor2D {
  const p = model.weights.layers[layer].proj[proj];
  let y = tf.matMul(x, p.wT) as tf.Tensor2D;
  if (p.bias) y = replacing(y, tf.add(y, p.bias) as tf.Tensor2D);
  return replacing(y, lora.apply(layer, proj, x, y));
}

/** Returns `next`, freeing `prev` (a tidy's intermediate) when next is a new tensor. */
function replacing<T extends tf.Tensor>(prev: tf.Tensor, next: T): T {
  if (next !== prev) prev.dispose();
  return next;
}

/** Embedding → decoder layers → final norm, for flattened tokens [T] at absolute positions. */
function decoderStack(model: LlamaModel, ids: Int32Array, positions: number[], lora: LoraBatch, attend: Attend): tf.Tensor2D {
  const c = model.config;
  const T = ids.length;
  const { cos, sinSigned } = ropeTables(positions, model.invFreq);
  let h = tf.gather(model.weights.embed, tf.tensor1d(ids, 'int32')) as tf.Tensor2D;
  for (let l = 0; l < c.numLayers; l++) {
    // One tidy per block (attention, then MLP): an enclosing tidy alone would keep every
    // intermediate alive until the step ends (~3 GB at 512 prompt tokens on a 135M model, past
    // wasm's 4 GB heap), and one per layer still held the attention block's ~12 [T, hidden]
    // tensors while the MLP's [T, intermediate] ones were made (peak 470 MB above the weights at
    // 4,096 prompt tokens on the 75M benchmark model). The wasm heap never shrinks, so a step's
    // peak is the server's resident memory from then on.
    const w = model.weights.layers[l];
    const mid = tf.tidy(() => {
      const x = rmsNorm(h, w.inputNorm, c.rmsNormEps);
      const q = applyRope(tf.reshape(linear(model, lora, l, 'q_proj', x), [T, c.numHeads, c.headDim]), cos, sinSigned);
      const k = applyRope(tf.reshape(linear(model, lora, l, 'k_proj', x), [T, c.numKvHeads, c.headDim]), cos, sinSigned);
      const v = tf.reshape(linear(model, lora, l, 'v_proj', x), [T, c.numKvHeads, c.headDim]) as tf.Tensor3D;
      return tf.add(h, linear(model, lora, l, 'o_proj', attend(l, q, k, v))) as tf.Tensor2D;
    });
    h.dispose();
    const next = tf.tidy(() => {
      const x2 = rmsNorm(mid, w.postAttentionNorm, c.rmsNormEps);
      // SiLU(gate) ⊙ up in its own scope: only the product outlives it
      // (each [T, intermediate] tensor freed once used: at most three are alive at a time)
      const act = tf.tidy(() => {
        const gate = linear(model, lora, l, 'gate_proj', x2);
        const sig = tf.sigmoid(gate);
        const silu = replacing(gate, tf.mul(gate, sig) as tf.Tensor2D);
        sig.dispose();
        const up = linear(model, lora, l, 'up_proj', x2);
        const out = tf.mul(silu, up) as tf.Tensor2D;
        silu.dispose();
        up.dispose();
        return out;
      });
      return tf.add(mid, linear(model, lora, l, 'down_proj', act)) as tf.Tensor2D;
    });
    mid.dispose();
    h = next;
  }
  return rmsNorm(h, model.weights.finalNorm, c.rmsNormEps);
}

/**
 * Additive causal mask [g·n, L] for n new queries after `past` cached tokens, repeated for the
 * g query heads that share a kv head (rows are ordered head-major, as the reshape lays them).
 * Null when every key is visible (one query, no window cut).
 */
function causalMask(n: number, past: number, groups: number, window: number | undefined): tf.Tensor2D | null {
  const L = past + n;
  if (n === 1 && (window === undefined || L <= window)) return null;
  const m = new Float32Array(groups * n * L).fill(MASKED);
  for (let i = 0; i < n; i++) {
    const pos = past + i;
    const first = window === undefined ? 0 : Math.max(0, pos - window + 1);
    for (let g = 0; g < groups; g++) m.fill(0, (g * n + i) * L + first, (g * n + i) * L + pos + 1);
  }
  return tf.tensor2d(m, [groups * n, L]);
}

function checkPositions(model: LlamaModel, past: number, n: number): void {
  const max = model.config.maxPositionEmbeddings;
  if (past + n > max) {
    throw new RequestError('CONTEXT_LENGTH_EXCEEDED', `sequence of ${past + n} tokens exceeds the model's context length ${max}`);
  }
}

/**
 * One forward step over sequences of any lengths (prefill, decode, or both), each with its own
 * adapter. Appends to the sequences' caches. Returns the requested logits rows, in sequence
 * order, as [rows, vocab] float32.
 */
export function forwardSequences(model: LlamaModel, steps: SequenceStep[], options: ForwardOptions = {}): tf.Tensor2D {
  const c = model.config;
  const groups = c.numHeads / c.numKvHeads;
  const scale = 1 / Math.sqrt(c.headDim);
  const ids: number[] = [];
  const positions: number[] = [];
  const segments: LoraRowSegment[] = [];
  const logitRows: number[] = [];
  for (const s of steps) {
    const past = s.cache?.length ?? 0;
    checkPositions(model, past, s.tokens.length);
    const start = ids.length;
    s.tokens.forEach((t, i) => {
      if (!Number.isInteger(t) || t < 0 || t >= c.vocabSize) {
        throw new RequestError('REQUEST_INVALID', `token id ${t} is outside the vocabulary [0, ${c.vocabSize})`);
      }
      ids.push(t);
      positions.push(past + i);
    });
    segments.push({ start, count: s.tokens.length, adapter: s.adapter });
    if (s.logits === 'all') for (let i = 0; i < s.tokens.length; i++) logitRows.push(start + i);
    else if (s.logits === 'last' && s.tokens.length > 0) logitRows.push(start + s.tokens.length - 1);
  }
  const lora = new LoraBatch(segments, ids.length, { strategy: options.loraStrategy, cost: options.loraCost, stackCache: options.stackCache });
  let result: tf.Tensor2D;
  try {
    result = tf.tidy(() => {
      const masks = steps.map((s) => causalMask(s.tokens.length, s.cache?.length ?? 0, groups, c.slidingWindow));
      const attend: Attend = (layer, q, k, v) => {
        // one tidy per sequence: only its output [n, H·d] outlives it (its ~15 intermediates
        // for every sequence of a 2,048-token prefill step at once were ~90 MB of peak heap)
        const outs = steps.map((s, i) => tf.tidy(() => {
          const { start, count: n } = segments[i];
          const qs = tf.reshape(tf.transpose(tf.slice(q, [start, 0, 0], [n, -1, -1]), [1, 0, 2]), [c.numKvHeads, groups * n, c.headDim]);
          const ksNew = tf.transpose(tf.slice(k, [start, 0, 0], [n, -1, -1]), [1, 2, 0]) as tf.Tensor3D;
          const vsNew = tf.transpose(tf.slice(v, [start, 0, 0], [n, -1, -1]), [1, 0, 2]) as tf.Tensor3D;
          const { kT, v: vs } = s.cache ? s.cache.append(layer, ksNew, vsNew) : { kT: ksNew, v: vsNew };
          let scores = tf.mul(tf.matMul(qs, kT), scale);
          const mask = masks[i];
          if (mask) scores = tf.add(scores, mask);
          const o = tf.matMul(tf.softmax(scores), vs); // [kvH, g·n, d]
          return tf.reshape(tf.transpose(tf.reshape(o, [c.numHeads, n, c.headDim]), [1, 0, 2]), [n, c.numHeads * c.headDim]) as tf.Tensor2D;
        }));
        return outs.length === 1 ? outs[0] : tf.concat(outs, 0);
      };
      const h = decoderStack(model, Int32Array.from(ids), positions, lora, attend);
      if (logitRows.length === 0) return tf.zeros([0, c.vocabSize]) as tf.Tensor2D;
      const rows = logitRows.length === ids.length ? h : (tf.gather(h, tf.tensor1d(logitRows, 'int32')) as tf.Tensor2D);
      return tf.matMul(rows, model.weights.lmHeadT);
    }) as tf.Tensor2D;
  } finally {
    lora.dispose();
  }
  for (const s of steps) s.cache?.commit(s.tokens.length);
  return result;
}

/**
 * One decode step for a packed batch: one new token per row, row b using adapters[b].
 * Returns logits [B, vocab].
 */
export function forwardDecode(
  model: LlamaModel,
  batch: DecodeBatchCache,
  tokens: number[],
  adapters: (LoraAdapter | null)[],
  options: ForwardOptions = {},
): tf.Tensor2D {
  const c = model.config;
  const B = batch.rows;
  if (tokens.length !== B || adapters.length !== B) {
    throw new RequestError('REQUEST_INVALID', `decode step needs one token and adapter per row (${B}), got ${tokens.length} and ${adapters.length}`);
  }
  for (const n of batch.lengths) checkPositions(model, n, 1);
  const groups = c.numHeads / c.numKvHeads;
  const scale = 1 / Math.sqrt(c.headDim);
  const segments: LoraRowSegment[] = [];
  adapters.forEach((adapter, b) => {
    const last = segments[segments.length - 1];
    if (last && last.adapter === adapter) last.count++;
    else segments.push({ start: b, count: 1, adapter });
  });
  const lora = new LoraBatch(segments, B, { strategy: options.loraStrategy, cost: options.loraCost, stackCache: options.stackCache });
  let result: tf.Tensor2D;
  try {
    result = tf.tidy(() => {
      const mask = batch.stepMask();
      const attend: Attend = (layer, q, k, v) => {
        const q4 = tf.reshape(q, [B, c.numKvHeads, groups, c.headDim]);
        const { kT, v: vs } = batch.appendColumn(
          layer,
          tf.reshape(k, [B, c.numKvHeads, c.headDim, 1]),
          tf.reshape(v, [B, c.numKvHeads, 1, c.headDim]),
        );
        let scores = tf.mul(tf.matMul(q4, kT), scale); // [B, kvH, g, C]
        if (mask) scores = tf.add(scores, mask);
        return tf.reshape(tf.matMul(tf.softmax(scores), vs), [B, c.numHeads * c.headDim]) as tf.Tensor2D;
      };
      const h = decoderStack(model, Int32Array.from(tokens), batch.lengths, lora, attend);
      return tf.matMul(h, model.weights.lmHeadT);
    }) as tf.Tensor2D;
  } finally {
    lora.dispose();
  }
  batch.commit();
  return result;
}
