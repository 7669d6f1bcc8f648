import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { parseModelConfig } from '../../../src/model/architecture/model-config.js';
import { encodeSafetensors } from '../../../src/model/formats/safetensors.js';
import { MAX_DELTA_GAIN, MAX_FACTOR_NORM } from '../../../src/model/lora/lora-delta-bounds.js';
import { readPeftAdapter } from '../../../src/model/lora/peft-adapter-reader.js';
import { resolvePeftConfig } from '../../../src/model/lora/peft-config.js';
import { peftConfigJson } from '../../../src/model/synthetic/hf-folder-writer.js';
import { randomLoraWeights } from '../../../src/model/synthetic/random-weights.js';
import { withCode } from '../../helpers/error-matchers.js';
import { TINY_CONFIGS } from '../../helpers/tiny-models.js';

const cfg = TINY_CONFIGS.gqa;
const model = parseModelConfig(cfg);
type Weights = Map<string, { shape: number[]; data: Float32Array }>;

/** An adapter's two files in memory, after `edit` changed its weights. */
function adapterBytes(config: Record<string, unknown>, edit?: (w: Weights) => void): { config: Uint8Array; weights: Uint8Array } {
  const w = randomLoraWeights(cfg, resolvePeftConfig(config, model, 64), 3, 0.2);
  edit?.(w);
  const tensors = [...w].map(([name, t]) => ({ name, shape: t.shape, dtype: 'F32' as const, data: t.data }));
  return { config: Buffer.from(JSON.stringify(config)), weights: encodeSafetensors(tensors) };
}

const read = (bytes: { config: Uint8Array; weights: Uint8Array }) => readPeftAdapter('up', model, 64, 'up', bytes);
const Q0 = 'base_model.model.model.layers.0.self_attn.q_proj';

/** Rank 1 on layer 0's q_proj with A = a·e₀ and B = b·e₀: the gain bound is exactly (alpha/1)·|a|·|b|. */
function rankOne(alpha: number, a: number, b: number) {
  const config = peftConfigJson({ r: 1, loraAlpha: alpha, targetModules: ['q_proj'], layersToTransform: [0] });
  return adapterBytes(config, (w) => {
    for (const [which, v] of [['A', a], ['B', b]] as const) {
      const t = w.get(`${Q0}.lora_${which}.weight`)!;
      t.data.fill(0);
      t.data[0] = v;
    }
  });
}

describe('delta bounds: adapters whose float32 forward could overflow are refused', () => {
  test('an ordinary adapter passes', async () => {
    const host = await read(adapterBytes(peftConfigJson({ r: 8, loraAlpha: 16, targetModules: 'all-linear' })));
    assert.equal(host.modules.length, 2 * 7);
  });

  test('lora_alpha 1e308 is refused, naming the scale and the module', async () => {
    await assert.rejects(read(adapterBytes(peftConfigJson({ r: 8, loraAlpha: 1e308, targetModules: ['v_proj'] }))), withCode('ADAPTER_WEIGHTS_OVERFLOW', 'model.layers.0.self_attn.v_proj', 'scale s = 1.25e+307', 'not a finite float32'));
  });

  test('one weight of 1e38 in lora_A is refused, naming lora_A and its module', async () => {
    const bytes = adapterBytes(peftConfigJson({ r: 4, loraAlpha: 8, targetModules: ['q_proj', 'v_proj'] }), (w) => {
      w.get('base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight')!.data[5] = 1e38;
    });
    await assert.rejects(read(bytes), withCode('ADAPTER_WEIGHTS_OVERFLOW', 'model.layers.1.self_attn.v_proj', '‖lora_A‖_F = 1.000e+38'));
  });

  test('a huge scale on an all-zero lora_B (a fresh PEFT adapter) is refused: the kernels would compute Inf·0', async () => {
    const bytes = adapterBytes(peftConfigJson({ r: 4, loraAlpha: 4e30, targetModules: ['q_proj'] }), (w) => {
      for (const [name, t] of w) if (name.includes('lora_B')) t.data.fill(0);
    });
    await assert.rejects(read(bytes), withCode('ADAPTER_WEIGHTS_OVERFLOW', 'scale s = 1e+30', `exceeds ${MAX_FACTOR_NORM}`));
  });

  test(`the gain bound |s|·‖B‖_F·‖A‖_F is accepted up to ${MAX_DELTA_GAIN} and refused just past it`, async () => {
    const atLimit = await read(rankOne(1, 100, MAX_DELTA_GAIN / 100));
    assert.equal(atLimit.modules.length, 1);
    await assert.rejects(read(rankOne(1.01, 100, MAX_DELTA_GAIN / 100)), withCode('ADAPTER_WEIGHTS_OVERFLOW', 'model.layers.0.self_attn.q_proj', 'gain bound', '= 1.010e+4 exceeds 10000'));
    // the same factors with a sign flipped: the bound is on magnitudes
    await assert.rejects(read(rankOne(1.01, -100, MAX_DELTA_GAIN / 100)), withCode('ADAPTER_WEIGHTS_OVERFLOW', 'gain bound'));
  });

  test('alpha_pattern and use_rslora scale each module as PEFT does: only the module past the bound is named', async () => {
    const config = { ...peftConfigJson({ r: 4, loraAlpha: 8, targetModules: ['q_proj', 'k_proj'], alphaPattern: { 'layers.1.self_attn.k_proj': 4e9 } }), use_rslora: true };
    // rslora: s = 4e9/√4 = 2e9, past MAX_FACTOR_NORM on that module only
    await assert.rejects(read(adapterBytes(config)), withCode('ADAPTER_WEIGHTS_OVERFLOW', 'model.layers.1.self_attn.k_proj: scale s = 2000000000'));
  });
});
