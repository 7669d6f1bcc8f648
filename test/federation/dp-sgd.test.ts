import * as tf from '@tensorflow/tfjs-core';
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { GaussianNoise } from '../../src/federation/aggregators/gaussian-noise.js';
import { DpSgd } from '../../src/federation/dp-sgd.js';
import { trainLocal } from '../../src/federation/local-trainer.js';
import { moduleSpecsFor, initialLoraFactors } from '../../src/federation/lora-init.js';
import type { FactorSet } from '../../src/federation/lora-factors.js';
import { TrainableLora, windowsLoss } from '../../src/federation/trainable-lora.js';
import { windowsFromIds } from '../../src/federation/training-data.js';
import { parseModelConfig } from '../../src/model/architecture/model-config.js';
import type { LlamaModel } from '../../src/model/forward/llama-model.js';
import { SeededRandom } from '../../src/model/synthetic/seeded-random.js';
import { memoryModel, TINY_CONFIGS, useWasm } from '../helpers/tiny-models.js';

let model: LlamaModel;
before(async () => {
  await useWasm();
  ({ model } = memoryModel(TINY_CONFIGS.gqa, 4));
});
after(() => model.dispose());

const CONFIG = parseModelConfig(TINY_CONFIGS.gqa);
const rng = new SeededRandom(3);
const WINDOWS = windowsFromIds(Array.from({ length: 9 * 6 }, () => 1 + rng.int(60)), 8);

/** fedavg over every projection with non-zero B, so every gradient is alive; plenty of coordinates for statistics. */
function trainable(): TrainableLora {
  const modules = moduleSpecsFor(CONFIG, { r: 8, alpha: 16, targetModules: ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'] });
  const global: FactorSet = initialLoraFactors(modules, 11);
  const r = new SeededRandom(12);
  for (const m of global.values()) m.b = r.normalArray(m.b!.length, 0.2);
  return TrainableLora.create({ method: 'fedavg', modules, global, alpha: 16, seed: 1 });
}

const KEY = new Uint8Array(32).fill(3);

test('DP-SGD with σ = 0: the step gradient is Σ_i clip_C(g_i) / (q·n), against per-window gradients clipped by hand', async () => {
  const t = trainable();
  try {
    const vars = t.variables;
    const C = 0.05;
    const q = 0.5;
    const batch = [0, 2, 3, 5];
    const dp = new DpSgd({ clipNorm: C, noiseMultiplier: 0, sampleRate: q }, new GaussianNoise(KEY, 'a'));
    const { grads, clipped } = await dp.gradient(model, WINDOWS, batch, vars, () => t.adapter());
    const got = grads.map((g) => Array.from(g.dataSync()));
    tf.dispose(grads);
    // reference: each window's gradient alone, its L2 norm over all variables, clipped in float64
    const want = vars.map((v) => new Float64Array(v.size));
    let over = 0;
    for (const i of batch) {
      const { value, grads: g } = tf.variableGrads(() => windowsLoss(model, [WINDOWS[i]], t.adapter()), vars);
      const parts = vars.map((v) => Array.from(g[v.name].dataSync()));
      tf.dispose([value, ...Object.values(g)]);
      const norm = Math.sqrt(parts.flat().reduce((s, x) => s + x * x, 0));
      if (norm > C) over++;
      const c = Math.min(1, C / norm);
      parts.forEach((p, k) => p.forEach((x, j) => (want[k][j] += (c * x) / (q * WINDOWS.length))));
    }
    assert.equal(clipped, over);
    assert.ok(over > 0, 'the clip binds for some window');
    got.forEach((g, k) => g.forEach((x, j) => assert.ok(Math.abs(x - want[k][j]) < 1e-6, `var ${k}[${j}]: ${x} vs ${want[k][j]}`)));
    const norm = Math.sqrt(got.flat().reduce((s, x) => s + x * x, 0));
    assert.ok(norm <= (batch.length * C) / (q * WINDOWS.length) + 1e-7, 'no window moves the step by more than C / (q·n)');
  } finally {
    t.dispose();
  }
});

test('DP-SGD noise: N(0, (σ·C)²) on the clipped sum, so the step gradient has std σ·C / (q·n) per coordinate', async () => {
  const t = trainable();
  try {
    const vars = t.variables;
    const sigma = 1.7;
    const C = 2;
    const q = 0.25;
    // an empty batch: what is left is the noise alone
    const dp = new DpSgd({ clipNorm: C, noiseMultiplier: sigma, sampleRate: q }, new GaussianNoise(KEY, 'b'));
    const { grads, loss } = await dp.gradient(model, WINDOWS, [], vars, () => t.adapter());
    const xs = grads.flatMap((g) => Array.from(g.dataSync()));
    tf.dispose(grads);
    assert.ok(Number.isNaN(loss));
    const n = xs.length;
    const mean = xs.reduce((s, x) => s + x, 0) / n;
    const std = Math.sqrt(xs.reduce((s, x) => s + (x - mean) ** 2, 0) / (n - 1));
    const want = (sigma * C) / (q * WINDOWS.length);
    assert.ok(n > 3000, `${n} coordinates`);
    assert.ok(Math.abs(std / want - 1) < 0.04, `std ${std} vs ${want}`);
    assert.ok(Math.abs(mean) < (4 * want) / Math.sqrt(n));
  } finally {
    t.dispose();
  }
});

test('Poisson sampling takes each window with probability q: batch sizes average q·n', () => {
  const dp = new DpSgd({ clipNorm: 1, noiseMultiplier: 1, sampleRate: 0.1 }, new GaussianNoise(KEY, 'c'));
  const sizes = Array.from({ length: 400 }, () => dp.sample(500).length);
  const mean = sizes.reduce((s, x) => s + x, 0) / sizes.length;
  // E = 50, sd of the mean = √(500·0.1·0.9 / 400) ≈ 0.34
  assert.ok(Math.abs(mean - 50) < 1.5, String(mean));
  assert.ok(new Set(sizes).size > 5, 'batch sizes vary');
});

test('trainLocal with dp trains by DP-SGD, reports q, and leaves no tensor behind', async () => {
  const modules = moduleSpecsFor(CONFIG, { r: 4, alpha: 8, targetModules: ['q_proj', 'v_proj'] });
  const before = tf.memory().numTensors;
  const result = await trainLocal(model, WINDOWS, { method: 'ffa', modules, global: initialLoraFactors(modules, 5), alpha: 8, seed: 2, steps: 3, batchSize: 2, lr: 0.01, dp: { clipNorm: 1, noiseMultiplier: 1 } });
  assert.equal(tf.memory().numTensors, before);
  assert.deepEqual(result.dp?.sampleRate, 2 / WINDOWS.length);
  assert.equal(result.steps, 3);
  const b = [...result.factors.values()].flatMap((m) => Array.from(m.b!));
  assert.ok(b.some((x) => x !== 0), 'B moved');
});
