import { randomBytes } from 'node:crypto';
import * as tf from '@tensorflow/tfjs-core';
import { FederationError } from '../errors.js';
import type { LlamaModel } from '../model/forward/llama-model.js';
import { LoraAdapter, loraModuleKey, type LoraModuleWeights } from '../model/lora/lora-adapter.js';
import type { ProjectionName } from '../model/architecture/llama-weights.js';
import { SeededRandom } from '../model/synthetic/seeded-random.js';
import type { FactorSet, ModuleFactors } from './lora-factors.js';
import { seededPermutation } from './training-data.js';
import { GaussianNoise } from './aggregators/gaussian-noise.js';
import { DpSgd } from './dp-sgd.js';
import { TrainableLora, windowsLoss, type TrainableSpec } from './trainable-lora.js';

/**
 * The client's half of federated LoRA: a few local epochs of Adam on the round's LoRA
 * factors through the same forward pass the server serves with. Base weights stay frozen
 * and are never copied; only the LoRA factors are variables (see trainable-lora.ts for
 * which ones per method).
 */

export interface LocalTrainingSpec extends TrainableSpec {
  /**
   * At most one of steps and epochs; epochs ⇒ steps = ⌈epochs · ⌈windows / batchSize⌉⌉.
   * @defaultValue one epoch
   */
  steps?: number;
  epochs?: number;
  /** Windows per step (the last batch of an epoch may be smaller). */
  batchSize: number;
  /** Adam's learning rate (β₁ 0.9, β₂ 0.999, tfjs' ε). */
  lr: number;
  /** After each step (1-based), with that step's loss; awaited, so it may report progress over the network. */
  onStep?: (step: number, steps: number, loss: number) => void | Promise<void>;
  /** Sample-level DP: DP-SGD (dp-sgd.ts) with q = batchSize / windows instead of shuffled batches. */
  dp?: { clipNorm: number; noiseMultiplier: number };
}

export interface LocalTrainingResult {
  /** Only what was trained: fedavg a+b, ffa b, flora the local a+b (rank localRank), fedsb r. */
  factors: FactorSet;
  /** Windows trained on: the weight of this client's update in the aggregate. */
  numExamples: number;
  /** Mean loss of the last epoch's worth of steps (all steps when fewer than one epoch). */
  trainLoss: number;
  steps: number;
  /** DP-SGD only: the sampling rate used, and how many per-window gradients were clipped. */
  dp?: { sampleRate: number; clipped: number };
}

/**
 * One round of DP-SGD on n windows, as the trainer runs it and the accountants (the client's
 * budget check, the server's per-client ε) count it: sampling rate q = batchSize / n (at most 1)
 * and `steps`, or ⌈epochs · ⌈n / batchSize⌉⌉ (one epoch by default).
 */
export function dpSgdRound(spec: Pick<LocalTrainingSpec, 'steps' | 'epochs' | 'batchSize'>, n: number): { sampleRate: number; steps: number } {
  return { sampleRate: Math.min(1, spec.batchSize / n), steps: stepCount(spec, Math.ceil(n / spec.batchSize)) };
}

function jobInvalid(message: string): never {
  throw new FederationError('FED_JOB_INVALID', message);
}

/** Refuses, as data errors, windows the forward pass would refuse (so a client reports them as such). */
function checkWindows(model: LlamaModel, windows: Int32Array[]): void {
  if (windows.length === 0) throw new FederationError('FED_DATA_INVALID', 'no training windows');
  const { vocabSize, maxPositionEmbeddings } = model.config;
  windows.forEach((w, k) => {
    if (w.length < 2) throw new FederationError('FED_DATA_INVALID', `window ${k} has ${w.length} token(s); a window needs at least 2`);
    if (w.length - 1 > maxPositionEmbeddings) {
      throw new FederationError('FED_DATA_INVALID', `window ${k} has ${w.length - 1} input tokens, past the model's context length ${maxPositionEmbeddings}`);
    }
    const bad = w.findIndex((t) => t < 0 || t >= vocabSize);
    if (bad >= 0) throw new FederationError('FED_DATA_INVALID', `window ${k} holds token id ${w[bad]}, outside the vocabulary [0, ${vocabSize})`);
  });
}

function stepCount(spec: Pick<LocalTrainingSpec, 'steps' | 'epochs'>, stepsPerEpoch: number): number {
  const { steps, epochs } = spec;
  if (steps !== undefined && epochs !== undefined) jobInvalid('give steps or epochs, not both');
  if (steps === undefined && epochs === undefined) return stepsPerEpoch;
  if (steps !== undefined) {
    if (!Number.isInteger(steps) || steps < 1) jobInvalid(`steps must be a positive integer, got ${steps}`);
    return steps;
  }
  if (!(epochs! > 0) || !Number.isFinite(epochs)) jobInvalid(`epochs must be positive, got ${epochs}`);
  return Math.ceil(epochs! * stepsPerEpoch);
}

/**
 * Batches of window indices: each epoch is a fresh seeded permutation of all windows, cut
 * into ⌈n / batchSize⌉ consecutive batches, so every window is seen once per epoch.
 */
function* batchSchedule(n: number, batchSize: number, seed: number): Generator<number[]> {
  const rng = new SeededRandom(seed);
  for (;;) {
    const order = seededPermutation(n, rng);
    for (let i = 0; i < n; i += batchSize) yield order.slice(i, i + batchSize);
  }
}

/**
 * Trains the round's LoRA on local windows (each window: inputs w[0..n-1), targets w[1..n))
 * with Adam, minimising the mean next-token cross-entropy of each batch. Every tensor it
 * makes (variables, Adam's moments, intermediates) is gone when it returns.
 */
export async function trainLocal(model: LlamaModel, windows: Int32Array[], spec: LocalTrainingSpec): Promise<LocalTrainingResult> {
  checkWindows(model, windows);
  if (!Number.isInteger(spec.batchSize) || spec.batchSize < 1) jobInvalid(`batchSize must be a positive integer, got ${spec.batchSize}`);
  if (!(spec.lr > 0) || !Number.isFinite(spec.lr)) jobInvalid(`lr must be positive, got ${spec.lr}`);
  if (spec.modules.length === 0) jobInvalid('no module to train');
  const stepsPerEpoch = Math.ceil(windows.length / spec.batchSize);
  const steps = stepCount(spec, stepsPerEpoch);
  const trainable = TrainableLora.create(spec);
  const optimizer = tf.train.adam(spec.lr);
  const losses: number[] = [];
  try {
    const vars = trainable.variables;
    const schedule = batchSchedule(windows.length, spec.batchSize, spec.seed);
    const { sampleRate } = dpSgdRound(spec, windows.length);
    const dp = spec.dp && new DpSgd({ ...spec.dp, sampleRate }, new GaussianNoise(randomBytes(32), 'dp-sgd'));
    let clipped = 0;
    for (let step = 1; step <= steps; step++) {
      let loss: number;
      if (dp) {
        // DP-SGD: Poisson batch, clipped per-window gradients, noise; Adam on the private gradient (post-processing)
        const g = await dp.gradient(model, windows, dp.sample(windows.length), vars, () => trainable.adapter());
        optimizer.applyGradients(vars.map((v, k) => ({ name: v.name, tensor: g.grads[k] })));
        tf.dispose(g.grads);
        loss = g.loss;
        clipped += g.clipped;
      } else {
        const batch = schedule.next().value as number[];
        const batchWindows = batch.map((i) => windows[i]);
        // minimize: L(θ) on the tape, ∂L/∂θ for vars only, one Adam update; returns L before the update
        const cost = optimizer.minimize(() => windowsLoss(model, batchWindows, trainable.adapter()), true, vars)!;
        try {
          loss = (await cost.data())[0];
        } finally {
          cost.dispose();
        }
      }
      // (NaN: a DP-SGD step whose Poisson batch was empty)
      if (!Number.isFinite(loss) && !(dp && Number.isNaN(loss))) jobInvalid(`the training loss is ${loss} at step ${step} (learning rate ${spec.lr} too high?)`);
      if (!Number.isNaN(loss)) losses.push(loss);
      await spec.onStep?.(step, steps, Number.isNaN(loss) ? (losses.at(-1) ?? NaN) : loss);
    }
    const last = losses.slice(-Math.min(losses.length, stepsPerEpoch));
    return {
      factors: await trainable.read(),
      numExamples: windows.length,
      trainLoss: last.length ? last.reduce((s, l) => s + l, 0) / last.length : NaN,
      steps,
      ...(dp ? { dp: { sampleRate, clipped } } : {}),
    };
  } finally {
    optimizer.dispose();
    trainable.dispose();
  }
}

/** Predicted tokens of a window: every token but the first. */
const predicted = (ws: Int32Array[]): number => ws.reduce((n, w) => n + w.length - 1, 0);

/**
 * Mean next-token cross-entropy over all windows (token-weighted across batches), with an
 * adapter or none: e.g. a held-out loss. L = Σ_b (N_b / N) · L_b.
 */
export async function meanLoss(model: LlamaModel, windows: Int32Array[], adapter: LoraAdapter | null, batchSize: number): Promise<number> {
  checkWindows(model, windows);
  const total = predicted(windows);
  let sum = 0;
  for (let s = 0; s < windows.length; s += batchSize) {
    const batch = windows.slice(s, s + batchSize);
    const l = windowsLoss(model, batch, adapter);
    try {
      sum += (await l.data())[0] * (predicted(batch) / total);
    } finally {
      l.dispose();
    }
  }
  return sum;
}

/**
 * ∂L/∂W for each module's full weight W [out, in] (PyTorch layout, row-major), L the mean loss
 * over ALL windows — what Fed-SB's gradient initialisation takes the SVD of. The model is not
 * touched: a LoRA with aT = I [in, in], bT = D [in, out], scale 1 gives
 *   y = x·Wᵀ + x·I·D = x·(Wᵀ + D)  ⇒  ∂L/∂D = ∂L/∂(Wᵀ) at D = 0,  so ∂L/∂W = (∂L/∂D)ᵀ.
 * Batches are accumulated weighted by their share of predicted tokens, as in meanLoss.
 */
export async function fullWeightGradients(
  model: LlamaModel,
  windows: Int32Array[],
  modules: ModuleFactors[],
  batchSize: number,
): Promise<Map<string, Float32Array>> {
  checkWindows(model, windows);
  if (!Number.isInteger(batchSize) || batchSize < 1) jobInvalid(`batchSize must be a positive integer, got ${batchSize}`);
  const eyes = new Map<number, tf.Tensor2D>();
  for (const m of modules) if (!eyes.has(m.inFeatures)) eyes.set(m.inFeatures, tf.eye(m.inFeatures) as tf.Tensor2D);
  const zeros = modules.map((m) => tf.zeros([m.inFeatures, m.outFeatures]) as tf.Tensor2D);
  const total = predicted(windows);
  let acc: tf.Tensor2D[] | undefined;
  try {
    for (let s = 0; s < windows.length; s += batchSize) {
      const batch = windows.slice(s, s + batchSize);
      const loss = (...ds: tf.Tensor[]): tf.Scalar => {
        const weights = new Map<string, LoraModuleWeights>();
        const targets = new Set<ProjectionName>();
        modules.forEach((m, i) => {
          weights.set(loraModuleKey(m.layer, m.proj), { aT: eyes.get(m.inFeatures)!, bT: ds[i] as tf.Tensor2D, rank: m.inFeatures, scale: 1 });
          targets.add(m.proj);
        });
        return windowsLoss(model, batch, new LoraAdapter('full-weight-gradient', weights, targets));
      };
      const grads = tf.grads(loss)(zeros) as tf.Tensor2D[];
      const share = predicted(batch) / total;
      const next = tf.tidy(() => grads.map((g, i) => (acc ? tf.add(acc[i], tf.mul(g, share)) : tf.mul(g, share)) as tf.Tensor2D));
      tf.dispose(grads);
      if (acc) tf.dispose(acc);
      acc = next;
      // let other work (job heartbeats, progress) run between batches
      await new Promise((resolve) => setImmediate(resolve));
    }
    const out = new Map<string, Float32Array>();
    for (let i = 0; i < modules.length; i++) {
      const w = tf.tidy(() => tf.transpose(acc![i]));
      try {
        out.set(modules[i].modulePath, (await w.data()) as Float32Array);
      } finally {
        w.dispose();
      }
    }
    return out;
  } finally {
    tf.dispose([...eyes.values(), ...zeros, ...(acc ?? [])]);
  }
}
