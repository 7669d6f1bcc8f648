import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { FederationError } from '../../src/errors.js';
import { aggregateFlora } from '../../src/federation/aggregators/flora.js';
import { fedsbRandomInit } from '../../src/federation/aggregators/fedsb-init.js';
import { toServedAdapter } from '../../src/federation/aggregators/served-adapter.js';
import type { FactorSet, FedMethod } from '../../src/federation/lora-factors.js';
import { parseModelConfig } from '../../src/model/architecture/model-config.js';
import { readPeftAdapter } from '../../src/model/lora/peft-adapter-reader.js';
import { SafetensorsReader } from '../../src/model/formats/safetensors.js';
import { TINY_CONFIGS } from '../helpers/tiny-models.js';
import { denseOf, mul, scaleDense, type Dense } from './dense-reference.js';
import { deltas, gqaModules, randomFactors, relErrAll } from './factor-fixtures.js';

const model = parseModelConfig(TINY_CONFIGS.gqa);
const MAX_RANK = 64;

/** Reads the served files back with the gateway's PEFT reader; returns s·B·A per module and the config JSON. */
async function servedDeltas(files: { config: Buffer; weights: Buffer }): Promise<{ delta: Map<string, Dense>; config: Record<string, unknown>; ranks: Map<string, number> }> {
  const host = await readPeftAdapter('/served', model, MAX_RANK, 'served', { config: files.config, weights: files.weights });
  const delta = new Map<string, Dense>();
  const ranks = new Map<string, number>();
  for (const { spec, a, b } of host.modules) {
    const outF = b.length / spec.rank;
    const inF = a.length / spec.rank;
    delta.set(spec.modulePath, scaleDense(mul(denseOf(outF, spec.rank, b), denseOf(spec.rank, inF, a)), spec.scale));
    ranks.set(spec.modulePath, spec.rank);
  }
  return { delta, config: JSON.parse(files.config.toString('utf8')) as Record<string, unknown>, ranks };
}

describe('toServedAdapter: the global state as a standard PEFT LoRA adapter', () => {
  const modules = gqaModules(8, ['q_proj', 'k_proj', 'down_proj'], [0, 1]);

  for (const [method, useRslora] of [['fedavg', false], ['ffa', false], ['fedavg', true]] as [FedMethod, boolean][]) {
    it(`${method}${useRslora ? ' with rsLoRA' : ''}: valid PEFT files (readPeftAdapter) whose s·B·A is the global's s·B·A, r and lora_alpha from the job`, async () => {
      const global = randomFactors(1, modules, ['a', 'b']);
      const files = toServedAdapter(method, global, { alpha: 16, useRslora, r: 8 });
      const { delta, config } = await servedDeltas(files);
      assert.deepEqual([config.r, config.lora_alpha, config.use_rslora], [8, 16, useRslora]);
      assert.deepEqual(config.target_modules, ['q_proj', 'k_proj', 'down_proj']);
      assert.deepEqual(config.layers_to_transform, [0, 1]);
      const s = useRslora ? 16 / Math.sqrt(8) : 16 / 8;
      assert.ok(relErrAll(delta, deltas(global, s)) < 1e-6);
      const reader = await SafetensorsReader.fromBytes(files.weights, 'adapter_model.safetensors');
      assert.equal(reader.metadata.format, 'pt');
      assert.ok(reader.entries().every((e) => e.dtype === 'F32' && e.name.startsWith('base_model.model.model.layers.')));
    });
  }

  it('flora: the stacked factors at scale 1 (r = lora_alpha = stacked rank, use_rslora false), so B·A is the exact aggregate', async () => {
    const updates = [4, 8, 16].map((r, k) => ({ client: `c${k}`, numExamples: 10 * (k + 1), scale: 16 / r, factors: randomFactors(10 + k, modules, ['a', 'b'], r) }));
    const { global } = aggregateFlora(undefined, updates, MAX_RANK);
    const files = toServedAdapter('flora', global, { alpha: 16, useRslora: true, r: 0 });
    const { delta, config } = await servedDeltas(files);
    assert.deepEqual([config.r, config.lora_alpha, config.use_rslora], [28, 28, false]);
    assert.ok(relErrAll(delta, deltas(global, 1)) < 1e-6);
  });

  it('flora with ranks differing per module: rank_pattern and alpha_pattern keep every module at scale 1', async () => {
    const global: FactorSet = new Map();
    const ranks = [28, 28, 10, 28, 16, 28];
    modules.forEach((m, i) => global.set(m.modulePath, randomFactors(20 + i, [m], ['a', 'b'], ranks[i]).get(m.modulePath)!));
    const files = toServedAdapter('flora', global, { alpha: 16, useRslora: false, r: 0 });
    const { delta, config, ranks: servedRanks } = await servedDeltas(files);
    assert.equal(config.r, 28);
    assert.deepEqual(config.rank_pattern, { [modules[2].modulePath]: 10, [modules[4].modulePath]: 16 });
    assert.deepEqual(config.alpha_pattern, config.rank_pattern);
    assert.deepEqual([...servedRanks.values()], ranks);
    assert.ok(relErrAll(delta, deltas(global, 1)) < 1e-6);
  });

  it('fedsb: lora_B = B·R̄ and lora_alpha = r (scale 1), so the served s·B′·A is B·R̄·A', async () => {
    const start = fedsbRandomInit(9, modules, 8);
    const global: FactorSet = new Map([...start].map(([k, m]) => [k, { ...m, r: randomFactors(30, [m], ['r']).get(k)!.r }]));
    const files = toServedAdapter('fedsb', global, { alpha: 16, useRslora: true, r: 8 });
    const { delta, config } = await servedDeltas(files);
    assert.deepEqual([config.r, config.lora_alpha, config.use_rslora], [8, 8, false]);
    assert.ok(relErrAll(delta, deltas(global, 1)) < 1e-6); // deltas() uses B·R·A when R is present
  });

  it('modules that are not every projection × every layer are named by their paths in target_modules', async () => {
    const some = [modules[0], modules[4]]; // layer 0 q_proj, layer 1 k_proj
    const global = randomFactors(40, some, ['a', 'b']);
    const files = toServedAdapter('fedavg', global, { alpha: 8, useRslora: false, r: 8 });
    const { delta, config } = await servedDeltas(files);
    assert.deepEqual(config.target_modules, [modules[0].modulePath, modules[4].modulePath]);
    assert.deepEqual([...delta.keys()], [modules[0].modulePath, modules[4].modulePath]);
    assert.ok(relErrAll(delta, deltas(global, 1)) < 1e-6);
  });

  it('an empty global (flora before its first round) has nothing to serve', () => {
    assert.throws(() => toServedAdapter('flora', new Map(), { alpha: 16, useRslora: false, r: 8 }), (e: unknown) => e instanceof FederationError && e.code === 'FED_ROUND_NOT_FOUND');
  });
});
