import * as tf from '@tensorflow/tfjs-core';
import type { ModelConfig } from '../architecture/model-config.js';

/**
 * inv_freq[i] = 1 / θ^(2i/d), i < d/2, then the scaling of transformers'
 * `modeling_rope_utils` (`_compute_linear_scaling_rope_parameters`,
 * `_compute_llama3_parameters`). Computed in float64: the positions·freq products are
 * what loses precision in float32, and this table is tiny.
 */
export function ropeInverseFrequencies(config: ModelConfig): Float64Array {
  const d = config.headDim;
  const half = d / 2;
  const invFreq = new Float64Array(half);
  for (let i = 0; i < half; i++) invFreq[i] = 1 / Math.pow(config.ropeTheta, (2 * i) / d);
  const s = config.ropeScaling;
  if (s.type === 'linear') {
    for (let i = 0; i < half; i++) invFreq[i] /= s.factor;
  } else if (s.type === 'llama3') {
    const lowFreqWavelen = s.originalMaxPositionEmbeddings / s.lowFreqFactor;
    const highFreqWavelen = s.originalMaxPositionEmbeddings / s.highFreqFactor;
    for (let i = 0; i < half; i++) {
      const wavelen = (2 * Math.PI) / invFreq[i];
      if (wavelen > lowFreqWavelen) {
        invFreq[i] = invFreq[i] / s.factor;
      } else if (wavelen >= highFreqWavelen) {
        // medium band: interpolate between scaled and unscaled
        const smooth = (s.originalMaxPositionEmbeddings / wavelen - s.lowFreqFactor) / (s.highFreqFactor - s.lowFreqFactor);
        invFreq[i] = (1 - smooth) * (invFreq[i] / s.factor) + smooth * invFreq[i];
      }
    }
  }
  return invFreq;
}

/**
 * cos/sin for the given absolute positions, laid out as transformers does:
 * emb = cat(freqs, freqs), so column j uses inv_freq[j mod d/2].
 * `sinSigned` folds rotate_half's sign in: rotate_half(x) = cat(-x[d/2:], x[:d/2]), so
 * x·cos + rotate_half(x)·sin = x·cos + swapHalves(x)·sinSigned with sinSigned = cat(-sin, sin).
 * Returns [T, 1, d] tensors that broadcast over heads.
 */
export function ropeTables(positions: ArrayLike<number>, invFreq: Float64Array): { cos: tf.Tensor3D; sinSigned: tf.Tensor3D } {
  const half = invFreq.length;
  const d = half * 2;
  const n = positions.length;
  const cos = new Float32Array(n * d);
  const sin = new Float32Array(n * d);
  for (let t = 0; t < n; t++) {
    const p = positions[t];
    for (let i = 0; i < half; i++) {
      const angle = p * invFreq[i];
      const c = Math.cos(angle);
      const s = Math.sin(angle);
      cos[t * d + i] = c;
      cos[t * d + half + i] = c;
      sin[t * d + i] = -s;
      sin[t * d + half + i] = s;
    }
  }
  return { cos: tf.tensor3d(cos, [n, 1, d]), sinSigned: tf.tensor3d(sin, [n, 1, d]) };
}

/** Applies RoPE to x [T, heads, d] with tables from ropeTables. */
export function applyRope(x: tf.Tensor3D, cos: tf.Tensor3D, sinSigned: tf.Tensor3D): tf.Tensor3D {
  const half = x.shape[2] / 2;
  // two slices, not tf.split: the wasm SplitV kernel copies the whole input once per piece
  const swapped = tf.concat([tf.slice(x, [0, 0, half], [-1, -1, half]), tf.slice(x, [0, 0, 0], [-1, -1, half])], 2);
  return tf.add(tf.mul(x, cos), tf.mul(swapped, sinSigned));
}
