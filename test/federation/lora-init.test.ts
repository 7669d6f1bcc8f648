import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { FederationError } from '../../src/errors.js';
import { initialLoraFactors, loraScale, moduleSeed, moduleSpecsFor, seededLoraA } from '../../src/federation/lora-init.js';
import { parseModelConfig } from '../../src/model/architecture/model-config.js';
import { TINY_CONFIGS } from '../helpers/tiny-models.js';

const config = parseModelConfig(TINY_CONFIGS.gqa);
const Q0 = { modulePath: 'model.layers.0.self_attn.q_proj', rank: 4, inFeatures: 32 };

describe('seededLoraA', () => {
  test('the same seed and module give the same A on every call', () => {
    assert.deepEqual(seededLoraA(42, Q0), seededLoraA(42, Q0));
    assert.equal(seededLoraA(42, Q0).length, 4 * 32);
  });

  test('different modules and different seeds give different A', () => {
    const a = seededLoraA(42, Q0);
    assert.notDeepEqual(seededLoraA(42, { ...Q0, modulePath: 'model.layers.1.self_attn.q_proj' }), a);
    assert.notDeepEqual(seededLoraA(42, { ...Q0, modulePath: 'model.layers.0.self_attn.v_proj' }), a);
    assert.notDeepEqual(seededLoraA(43, Q0), a);
    // seeds past 2³² still matter (all 53 bits are mixed in)
    assert.notEqual(moduleSeed(2 ** 32 + 5, Q0.modulePath), moduleSeed(5, Q0.modulePath));
  });

  test('a higher rank extends the same rows: row i of A depends on the seed, module and i only', () => {
    const r4 = seededLoraA(7, Q0);
    const r8 = seededLoraA(7, { ...Q0, rank: 8 });
    assert.deepEqual(r8.subarray(0, r4.length), r4);
  });

  test('values follow kaiming_uniform_(a=√5): inside ±1/√in, spread over the whole range, mean ≈ 0', () => {
    const inFeatures = 48;
    const a = seededLoraA(3, { modulePath: 'model.layers.0.mlp.down_proj', rank: 64, inFeatures });
    const bound = 1 / Math.sqrt(inFeatures);
    let min = Infinity;
    let max = -Infinity;
    let sum = 0;
    let sq = 0;
    for (const v of a) {
      min = Math.min(min, v);
      max = Math.max(max, v);
      sum += v;
      sq += v * v;
    }
    assert.ok(min >= -bound && max <= bound, `[${min}, ${max}] inside ±${bound}`);
    assert.ok(min < -0.95 * bound && max > 0.95 * bound, 'fills the range');
    assert.ok(Math.abs(sum / a.length) < 0.05 * bound, 'mean near 0');
    // U(−b, b) has variance b²/3
    assert.ok(Math.abs(sq / a.length / (bound * bound / 3) - 1) < 0.1, 'variance b²/3');
  });
});

describe('module specs and scales', () => {
  test('moduleSpecsFor lists the target modules in model order with their shapes', () => {
    const specs = moduleSpecsFor(config, { r: 4, alpha: 8, targetModules: ['v_proj', 'q_proj', 'down_proj'] });
    assert.deepEqual(
      specs.map((m) => [m.modulePath, m.layer, m.proj, m.inFeatures, m.outFeatures, m.rank]),
      [
        ['model.layers.0.self_attn.q_proj', 0, 'q_proj', 32, 32, 4],
        ['model.layers.0.self_attn.v_proj', 0, 'v_proj', 32, 16, 4],
        ['model.layers.0.mlp.down_proj', 0, 'down_proj', 48, 32, 4],
        ['model.layers.1.self_attn.q_proj', 1, 'q_proj', 32, 32, 4],
        ['model.layers.1.self_attn.v_proj', 1, 'v_proj', 32, 16, 4],
        ['model.layers.1.mlp.down_proj', 1, 'down_proj', 48, 32, 4],
      ],
    );
    assert.equal(moduleSpecsFor(config, { r: 2, alpha: 4, targetModules: 'all-linear' }).length, 14);
  });

  test('moduleSpecsFor refuses a module the model lacks with FED_TARGET_MODULE_UNKNOWN', () => {
    assert.throws(
      () => moduleSpecsFor(config, { r: 4, alpha: 8, targetModules: ['qkv_proj'] }),
      (err: unknown) => err instanceof FederationError && err.code === 'FED_TARGET_MODULE_UNKNOWN' && /qkv_proj/.test(err.message),
    );
  });

  test('loraScale is alpha/r, or alpha/√r with rsLoRA', () => {
    assert.equal(loraScale(16, 8), 2);
    assert.equal(loraScale(16, 8, false), 2);
    assert.equal(loraScale(16, 16, true), 4);
  });

  test('initialLoraFactors: a = seededLoraA, b = 0, in PEFT shapes', () => {
    const specs = moduleSpecsFor(config, { r: 4, alpha: 8, targetModules: ['v_proj'] });
    const set = initialLoraFactors(specs, 11);
    assert.deepEqual([...set.keys()], specs.map((m) => m.modulePath));
    for (const m of specs) {
      const f = set.get(m.modulePath)!;
      assert.deepEqual(f.a, seededLoraA(11, m));
      assert.equal(f.b!.length, m.outFeatures * m.rank);
      assert.ok(f.b!.every((v) => v === 0));
    }
  });
});
