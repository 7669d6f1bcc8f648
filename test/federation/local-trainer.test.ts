import * as tf from '@tensorflow/tfjs-core';
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { FederationError } from '../../src/errors.js';
import { fullWeightGradients, meanLoss, trainLocal, type LocalTrainingSpec } from '../../src/federation/local-trainer.js';
import type { FactorSet, FedMethod, ModuleFactors } from '../../src/federation/lora-factors.js';
import { initialLoraFactors, loraScale, moduleSpecsFor, seededLoraA } from '../../src/federation/lora-init.js';
import { adapterFromFactors, TrainableLora, windowsLoss, type TrainableSpec } from '../../src/federation/trainable-lora.js';
import { windowsFromIds } from '../../src/federation/training-data.js';
import { llamaWeightsFromArrays } from '../../src/model/architecture/llama-weights.js';
import { parseModelConfig } from '../../src/model/architecture/model-config.js';
import { LlamaModel } from '../../src/model/forward/llama-model.js';
import { SeededRandom } from '../../src/model/synthetic/seeded-random.js';
import { memoryModel, TINY_CONFIGS, useWasm } from '../helpers/tiny-models.js';

let model: LlamaModel;
let weights: Map<string, Float32Array>;
before(async () => {
  await useWasm();
  ({ model, weights } = memoryModel(TINY_CONFIGS.gqa, 4));
});
after(() => model.dispose());

// square (q 32→32), narrowing (v 32→16) and widening-input (down 48→32) modules catch transposes
const MODULES = moduleSpecsFor(parseModelConfig(TINY_CONFIGS.gqa), { r: 4, alpha: 8, targetModules: ['q_proj', 'v_proj', 'down_proj'] });
const ALPHA = 8;
const JOB_SEED = 1234;

/** A fixed 8-token pattern repeated: windows of 9 shift by one, every next token is predictable. */
const PATTERN = [5, 17, 23, 8, 41, 12, 30, 9];
const WINDOWS = windowsFromIds(Array.from({ length: 9 * 12 }, (_, i) => PATTERN[i % PATTERN.length]), 8);

function randomFactors(modules: ModuleFactors[], seed: number, which: ('a' | 'b' | 'r')[], std = 0.3, rank?: number): FactorSet {
  const rng = new SeededRandom(seed);
  const set: FactorSet = new Map();
  for (const m0 of modules) {
    const m = { ...m0, rank: rank ?? m0.rank };
    const f: ModuleFactors = { modulePath: m.modulePath, layer: m.layer, proj: m.proj, inFeatures: m.inFeatures, outFeatures: m.outFeatures, rank: m.rank };
    if (which.includes('a')) f.a = rng.normalArray(m.rank * m.inFeatures, std);
    if (which.includes('b')) f.b = rng.normalArray(m.outFeatures * m.rank, std);
    if (which.includes('r')) f.r = rng.normalArray(m.rank * m.rank, std);
    set.set(m.modulePath, f);
  }
  return set;
}

function cloneFactors(set: FactorSet): FactorSet {
  const copy = (f: ModuleFactors): ModuleFactors => {
    const c = { ...f };
    for (const k of ['a', 'b', 'r'] as const) if (f[k]) c[k] = f[k]!.slice();
    return c;
  };
  return new Map([...set].map(([k, f]) => [k, copy(f)]));
}

/** A round's starting point per method, with non-zero factors everywhere so every gradient is alive. */
function globalFor(method: FedMethod, seed: number): FactorSet {
  switch (method) {
    case 'fedavg':
      return randomFactors(MODULES, seed, ['a', 'b']);
    case 'ffa': {
      const g = randomFactors(MODULES, seed, ['b']);
      for (const m of g.values()) m.a = seededLoraA(JOB_SEED, m);
      return g;
    }
    case 'flora':
      return randomFactors(MODULES, seed, ['a', 'b'], 0.3, 3); // global rank 3 ≠ local rank 2
    case 'fedsb':
      return randomFactors(MODULES, seed, ['a', 'b', 'r']);
  }
}

function trainableSpec(method: FedMethod, global: FactorSet): TrainableSpec {
  return { method, modules: MODULES, global, alpha: ALPHA, localRank: 2, seed: 99 };
}

const METHODS: FedMethod[] = ['fedavg', 'ffa', 'flora', 'fedsb'];

describe('gradients of the trainable factors', () => {
  for (const method of METHODS) {
    test(`${method}: the analytic gradient w.r.t. every trained factor matches central finite differences`, () => {
      const t = TrainableLora.create(trainableSpec(method, globalFor(method, 5)));
      const vars = t.variables;
      const expected = { fedavg: 2, ffa: 1, flora: 2, fedsb: 1 }[method] * MODULES.length;
      assert.equal(vars.length, expected, 'trainable variables per method');
      // move every variable off its initial value (flora's B_k = 0 would zero ∂L/∂A_k)
      const rng = new SeededRandom(8);
      for (const v of vars) tf.tidy(() => v.assign(tf.tensor(rng.normalArray(v.size, 0.3), v.shape)));
      const batch = WINDOWS.slice(0, 2);
      const f = () => windowsLoss(model, batch, t.adapter());
      const { value, grads } = tf.variableGrads(f, vars);
      value.dispose();
      const eps = 1e-2;
      for (const v of [vars[0], vars[vars.length - 1]]) {
        const g = grads[v.name].dataSync();
        const base = v.dataSync().slice();
        // the two largest entries (well above float32 noise) and one fixed entry
        const order = [...g.keys()].sort((i, j) => Math.abs(g[j]) - Math.abs(g[i]));
        for (const idx of [order[0], order[1], 3]) {
          const lossAt = (delta: number) => {
            const d = base.slice();
            d[idx] += delta;
            tf.tidy(() => v.assign(tf.tensor(d, v.shape)));
            return tf.tidy(() => f().dataSync()[0]);
          };
          const numeric = (lossAt(eps) - lossAt(-eps)) / (2 * eps);
          tf.tidy(() => v.assign(tf.tensor(base, v.shape)));
          assert.ok(Math.abs(numeric - g[idx]) < 2e-2 * Math.abs(numeric) + 2e-4, `${v.name}[${idx}]: analytic ${g[idx]} vs numeric ${numeric}`);
        }
        assert.ok(Math.abs(g[order[0]]) > 1e-3, 'the gradient is alive');
      }
      tf.dispose(Object.values(grads));
      t.dispose();
    });
  }

  test('fullWeightGradients equals finite differences of the mean loss over all windows on W entries (batches token-weighted)', async () => {
    // windows of different lengths over batches of 2: [9, 9], [5] tokens weigh 16/20 and 4/20
    const windows = [WINDOWS[0], WINDOWS[3], WINDOWS[5].slice(0, 5)];
    const modules = [MODULES[1], MODULES[5]]; // layer 0 v_proj [16, 32], layer 1 down_proj [32, 48]
    const before = tf.memory().numTensors;
    const grads = await fullWeightGradients(model, windows, modules, 2);
    assert.equal(tf.memory().numTensors, before, 'no tensor left behind');
    const eps = 1e-2;
    for (const m of modules) {
      const g = grads.get(m.modulePath)!;
      assert.equal(g.length, m.outFeatures * m.inFeatures);
      const order = [...g.keys()].sort((i, j) => Math.abs(g[j]) - Math.abs(g[i]));
      for (const idx of [order[0], order[1], 7]) {
        const lossAt = async (delta: number) => {
          const w = new Map(weights);
          const changed = weights.get(`${m.modulePath}.weight`)!.slice(); // [out, in]: idx = o·in + i
          changed[idx] += delta;
          w.set(`${m.modulePath}.weight`, changed);
          const perturbed = new LlamaModel(model.config, llamaWeightsFromArrays(model.config, w));
          try {
            return await meanLoss(perturbed, windows, null, windows.length);
          } finally {
            perturbed.dispose();
          }
        };
        const numeric = ((await lossAt(eps)) - (await lossAt(-eps))) / (2 * eps);
        assert.ok(Math.abs(numeric - g[idx]) < 2e-2 * Math.abs(numeric) + 2e-4, `${m.modulePath} W[${idx}]: analytic ${g[idx]} vs numeric ${numeric}`);
      }
      assert.ok(Math.abs(g[order[0]]) > 1e-3, 'the gradient is alive');
    }
  });
});

/** The loss of an explicit PEFT adapter built from host factors, as a serving client would load it. */
async function explicitLoss(factors: Iterable<ModuleFactors>, scale: number): Promise<number> {
  const adapter = adapterFromFactors('eval', factors, scale);
  try {
    return await meanLoss(model, WINDOWS, adapter, 4);
  } finally {
    adapter.dispose();
  }
}

/** FLoRA's ΔW = B_g·A_g + s_k·B_k·A_k as one stacked PEFT LoRA at scale 1: A = [A_g; s_k·A_k], B = [B_g | B_k]. */
function stackFlora(global: FactorSet, local: FactorSet, sk: number): ModuleFactors[] {
  return [...local.values()].map((l) => {
    const g = global.get(l.modulePath)!;
    const rank = g.rank + l.rank;
    const a = new Float32Array(rank * l.inFeatures);
    a.set(g.a!);
    a.set(l.a!.map((v) => v * sk), g.a!.length);
    const b = new Float32Array(l.outFeatures * rank);
    for (let o = 0; o < l.outFeatures; o++) {
      for (let j = 0; j < g.rank; j++) b[o * rank + j] = g.b![o * g.rank + j];
      for (let j = 0; j < l.rank; j++) b[o * rank + g.rank + j] = l.b![o * l.rank + j];
    }
    return { ...l, rank, a, b };
  });
}

function trainingSpec(method: FedMethod, global: FactorSet, over: Partial<LocalTrainingSpec> = {}): LocalTrainingSpec {
  return { ...trainableSpec(method, global), steps: 20, batchSize: 4, lr: 1e-2, ...over };
}

/** Round-1 starting points as a job starts them: fresh A, B = 0; flora nothing; fedsb fixed A, B and a start R. */
function roundOneGlobal(method: FedMethod): FactorSet {
  if (method === 'flora') return new Map();
  if (method === 'fedsb') return randomFactors(MODULES, 3, ['a', 'b', 'r'], 0.5);
  return initialLoraFactors(MODULES, JOB_SEED);
}

describe('what the trained factors mean', () => {
  for (const method of METHODS) {
    test(`${method}: the training adapter applies exactly the PEFT adapter its returned factors describe`, async () => {
      const global = globalFor(method, 12);
      const t = TrainableLora.create(trainableSpec(method, global));
      try {
        const rng = new SeededRandom(13);
        for (const v of t.variables) tf.tidy(() => v.assign(tf.tensor(rng.normalArray(v.size, 0.3), v.shape)));
        const trained = await t.read();
        const training = tf.tidy(() => windowsLoss(model, WINDOWS, t.adapter()).dataSync()[0]);
        const withGlobal = (f: ModuleFactors): ModuleFactors => ({ ...global.get(f.modulePath)!, ...f });
        const explicit =
          method === 'flora'
            ? await explicitLoss(stackFlora(global, trained, loraScale(ALPHA, 2)), 1)
            : await explicitLoss([...trained.values()].map(withGlobal), method === 'fedsb' ? 1 : loraScale(ALPHA, 4));
        assert.ok(Math.abs(training - explicit) < 1e-4, `training ${training} vs explicit ${explicit}`);
      } finally {
        t.dispose();
      }
    });
  }
});

describe('trainLocal', () => {
  for (const method of METHODS) {
    test(`${method}: 20 Adam steps lower the loss, and the returned factors carry the lower loss`, async () => {
      const global = roundOneGlobal(method);
      const untouched = cloneFactors(global);
      const losses: number[] = [];
      // Fed-SB trains only r² entries per module (16 here, against 4·(in+out) for LoRA): a larger step
      const lr = method === 'fedsb' ? 3e-2 : 1e-2;
      const result = await trainLocal(model, WINDOWS, trainingSpec(method, global, { lr, onStep: (_step, _steps, loss) => void losses.push(loss) }));
      assert.equal(result.steps, 20);
      assert.equal(result.numExamples, WINDOWS.length);
      assert.equal(losses.length, 20);
      // 12 windows / batch 4 = 3 steps per epoch: trainLoss is the mean of the last 3
      assert.ok(Math.abs(result.trainLoss - (losses[17] + losses[18] + losses[19]) / 3) < 1e-6);
      assert.ok(result.trainLoss < 0.8 * losses[0], `train loss ${losses[0]} → ${result.trainLoss}`);
      assert.deepEqual(global, untouched, 'the global state handed in is not mutated');

      const s = loraScale(ALPHA, 4);
      const [before, after] =
        method === 'fedavg'
          ? [await explicitLoss(global.values(), s), await explicitLoss(result.factors.values(), s)]
          : method === 'ffa'
            ? [await explicitLoss(global.values(), s), await explicitLoss([...result.factors.values()].map((f) => ({ ...f, a: global.get(f.modulePath)!.a })), s)]
            : method === 'flora'
              ? [await meanLoss(model, WINDOWS, null, 4), await explicitLoss(result.factors.values(), loraScale(ALPHA, 2))]
              : [await explicitLoss(global.values(), 1), await explicitLoss([...result.factors.values()].map((f) => ({ ...global.get(f.modulePath)!, r: f.r })), 1)];
      assert.ok(after < 0.8 * before, `held loss ${before} → ${after}`);
    });
  }

  test('ffa returns only b, of the job rank; the frozen A is the one derived from the job seed and never moves', async () => {
    const global = globalFor('ffa', 6);
    const result = await trainLocal(model, WINDOWS, trainingSpec('ffa', global, { steps: 3 }));
    assert.deepEqual([...result.factors.keys()], MODULES.map((m) => m.modulePath));
    for (const m of MODULES) {
      const f = result.factors.get(m.modulePath)!;
      assert.equal(f.a, undefined);
      assert.equal(f.r, undefined);
      assert.equal(f.b!.length, m.outFeatures * 4);
      assert.notDeepEqual(f.b, global.get(m.modulePath)!.b, 'B trained');
      assert.deepEqual(global.get(m.modulePath)!.a, seededLoraA(JOB_SEED, m), 'A as derived');
    }
  });

  test('fedsb returns only r [rank, rank]; fedavg returns a and b, both trained', async () => {
    const sb = await trainLocal(model, WINDOWS, trainingSpec('fedsb', globalFor('fedsb', 7), { steps: 2 }));
    for (const f of sb.factors.values()) {
      assert.deepEqual([f.a, f.b, f.r?.length], [undefined, undefined, 16]);
    }
    const global = globalFor('fedavg', 8);
    const avg = await trainLocal(model, WINDOWS, trainingSpec('fedavg', global, { steps: 2 }));
    for (const f of avg.factors.values()) {
      const g = global.get(f.modulePath)!;
      assert.equal(f.r, undefined);
      assert.equal(f.a!.length, g.a!.length);
      assert.notDeepEqual(f.a, g.a);
      assert.notDeepEqual(f.b, g.b);
    }
  });

  test('flora trains a fresh rank-localRank LoRA on top of the frozen global and returns only it', async () => {
    const global = globalFor('flora', 9); // rank 3
    const untouched = cloneFactors(global);
    const losses: number[] = [];
    const spec = trainingSpec('flora', global, { steps: 5, batchSize: WINDOWS.length, onStep: (_s, _n, l) => void losses.push(l) });
    const result = await trainLocal(model, WINDOWS, spec);
    assert.deepEqual(global, untouched);
    // step 1 sees every window with B_k = 0: its loss is the global adapter's own, applied at scale 1
    const globalLoss = await explicitLoss(global.values(), 1);
    assert.ok(Math.abs(losses[0] - globalLoss) < 1e-4, `step 1 ${losses[0]} vs global ${globalLoss}`);
    for (const m of MODULES) {
      const f = result.factors.get(m.modulePath)!;
      assert.equal(f.rank, 2);
      assert.equal(f.a!.length, 2 * m.inFeatures);
      assert.equal(f.b!.length, m.outFeatures * 2);
    }
    // the client's model after training is global + s_k·local, stacked
    const stacked = await explicitLoss(stackFlora(global, result.factors, loraScale(ALPHA, 2)), 1);
    assert.ok(stacked < globalLoss, 'global + local beats the global alone');
  });

  test('epochs set the step count to epochs · ⌈windows / batchSize⌉, with 1-based onStep calls; the same seed repeats exactly', async () => {
    const calls: [number, number][] = [];
    const spec = trainingSpec('fedavg', initialLoraFactors(MODULES, JOB_SEED), { steps: undefined, epochs: 2, batchSize: 5, onStep: async (s, n) => void calls.push([s, n]) });
    const a = await trainLocal(model, WINDOWS, spec);
    assert.equal(a.steps, 6);
    assert.deepEqual(calls, [1, 2, 3, 4, 5, 6].map((s) => [s, 6]));
    const b = await trainLocal(model, WINDOWS, { ...spec, onStep: undefined });
    assert.deepEqual(b.factors, a.factors);
    assert.equal(b.trainLoss, a.trainLoss);
    assert.equal((await trainLocal(model, WINDOWS, { ...spec, epochs: undefined, onStep: undefined })).steps, 3, 'one epoch by default');
  });

  test('bad inputs are refused with federation codes', async () => {
    const code = (c: string) => (err: unknown) => err instanceof FederationError && err.code === c;
    const g = initialLoraFactors(MODULES, 1);
    await assert.rejects(trainLocal(model, [], trainingSpec('fedavg', g)), code('FED_DATA_INVALID'));
    await assert.rejects(trainLocal(model, [Int32Array.of(1, 2, 61)], trainingSpec('fedavg', g)), code('FED_DATA_INVALID'), 'id past the vocab of 61');
    await assert.rejects(trainLocal(model, [new Int32Array(258)], trainingSpec('fedavg', g)), code('FED_DATA_INVALID'), '257 inputs past 256 positions');
    await assert.rejects(fullWeightGradients(model, [Int32Array.of(4)], MODULES, 1), code('FED_DATA_INVALID'), 'a window needs a target');
    await assert.rejects(trainLocal(model, WINDOWS, trainingSpec('fedavg', g, { epochs: 1 })), code('FED_JOB_INVALID'));
    await assert.rejects(trainLocal(model, WINDOWS, trainingSpec('fedavg', new Map())), code('FED_JOB_INVALID'));
    const wrong = cloneFactors(g);
    wrong.get(MODULES[0].modulePath)!.b = new Float32Array(3);
    const before = tf.memory().numTensors;
    await assert.rejects(trainLocal(model, WINDOWS, trainingSpec('fedavg', wrong)), code('FED_JOB_INVALID'));
    assert.equal(tf.memory().numTensors, before, 'a refusal half-way frees what it had built');
  });

  test('five rounds of every method leave tf.memory().numTensors where it was', async () => {
    const before = tf.memory().numTensors;
    for (let round = 0; round < 5; round++) {
      for (const method of METHODS) {
        await trainLocal(model, WINDOWS, trainingSpec(method, globalFor(method, round), { steps: 2 }));
        assert.equal(tf.memory().numTensors, before, `${method} round ${round}`);
      }
    }
  });
});

describe('evaluation helpers', () => {
  test('adapterFromFactors with r applies B·R·A: the same loss as a plain LoRA with A′ = R·A', async () => {
    const g = globalFor('fedsb', 10);
    const folded = [...g.values()].map((m) => {
      const a = new Float32Array(m.rank * m.inFeatures);
      for (let i = 0; i < m.rank; i++) for (let k = 0; k < m.rank; k++) for (let j = 0; j < m.inFeatures; j++) a[i * m.inFeatures + j] += m.r![i * m.rank + k] * m.a![k * m.inFeatures + j];
      return { ...m, a, r: undefined };
    });
    const withR = await explicitLoss(g.values(), 1);
    assert.ok(Math.abs(withR - (await explicitLoss(folded, 1))) < 1e-5);
    assert.ok(Math.abs(withR - (await meanLoss(model, WINDOWS, null, 4))) > 1e-3, 'the adapter changes the loss');
  });
});
