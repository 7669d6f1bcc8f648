import * as tf from '@tensorflow/tfjs-core';
import type { LoraAdapter } from '../model/lora/lora-adapter.js';
import type { LlamaModel } from '../model/forward/llama-model.js';
import { GaussianNoise } from './aggregators/gaussian-noise.js';
import { windowsLoss } from './trainable-lora.js';

/**
 * One DP-SGD step (Abadi et al. 2016) as Opacus takes it: a Poisson-sampled batch (every
 * window independently with probability q = batch_size / n), one gradient per window of the
 * trainable factors, each clipped to L2 norm C over all of them, summed, Gaussian noise
 * N(0, (σ·C)²) added to every coordinate, divided by the expected batch size q·n:
 *
 *   ĝ = (Σ_{i ∈ batch} g_i · min(1, C / ‖g_i‖) + N(0, σ²C² I)) / (q·n)
 *
 * An empty batch still takes a step of pure noise (as Opacus does), so that the step count and
 * the accountant's stay equal. Sampling and noise come from a cryptographic stream.
 */
export interface DpSgdOptions {
  clipNorm: number;
  noiseMultiplier: number;
  /** q = batch_size / n (at most 1). */
  sampleRate: number;
}

export class DpSgd {
  private readonly o: DpSgdOptions;
  private readonly rng: GaussianNoise;

  constructor(options: DpSgdOptions, rng: GaussianNoise) {
    this.o = options;
    this.rng = rng;
  }

  /** The window indices of one Poisson-sampled batch. */
  sample(n: number): number[] {
    const out: number[] = [];
    for (let i = 0; i < n; i++) if (this.rng.uniform() < this.o.sampleRate) out.push(i);
    return out;
  }

  /**
   * The privatized gradient of one step for `vars` (same order), and the mean loss of the
   * sampled windows (NaN for an empty batch). The caller applies the gradient and disposes it.
   */
  async gradient(model: LlamaModel, windows: Int32Array[], batch: number[], vars: tf.Variable[], adapter: () => LoraAdapter): Promise<{ grads: tf.Tensor[]; loss: number; clipped: number }> {
    const { clipNorm, noiseMultiplier, sampleRate } = this.o;
    let sum = vars.map((v) => tf.zerosLike(v) as tf.Tensor);
    let lossSum = 0;
    let clipped = 0;
    try {
      for (const i of batch) {
        const { value, grads } = tf.variableGrads(() => windowsLoss(model, [windows[i]], adapter()), vars);
        const g = vars.map((v) => grads[v.name]);
        const sq = tf.tidy(() => tf.addN(g.map((x) => tf.sum(tf.square(x)))));
        const norm = Math.sqrt((await sq.data())[0]);
        sq.dispose();
        const c = norm > clipNorm ? clipNorm / norm : 1;
        if (c < 1) clipped++;
        lossSum += (await value.data())[0];
        const next = tf.tidy(() => sum.map((s, k) => tf.add(s, tf.mul(g[k], c))));
        tf.dispose([value, ...Object.values(grads), ...sum]);
        sum = next;
        // other work (heartbeats, the job's lock renewal) runs between examples
        await new Promise((r) => setImmediate(r));
      }
      const expected = sampleRate * windows.length;
      const std = noiseMultiplier * clipNorm;
      const grads = sum.map((s) => {
        const noise = new Float32Array(s.size);
        for (let j = 0; j < noise.length; j++) noise[j] = std * this.rng.normal();
        return tf.tidy(() => tf.div(tf.add(s, tf.tensor(noise, s.shape)), expected));
      });
      return { grads, loss: batch.length ? lossSum / batch.length : NaN, clipped };
    } finally {
      tf.dispose(sum);
    }
  }
}
