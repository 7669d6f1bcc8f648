import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { AdapterError } from '../../../src/errors.js';
import { parseModelConfig } from '../../../src/model/architecture/model-config.js';
import { resolvePeftConfig } from '../../../src/model/lora/peft-config.js';
import { TINY_CONFIGS } from '../../helpers/tiny-models.js';

const model = parseModelConfig({ ...TINY_CONFIGS.gqa, num_hidden_layers: 3 });

function cfg(over: Record<string, unknown>): Record<string, unknown> {
  return { peft_type: 'LORA', r: 8, lora_alpha: 16, target_modules: ['q_proj', 'v_proj'], bias: 'none', ...over };
}

function rejects(json: Record<string, unknown>, code: string, pattern?: RegExp): void {
  assert.throws(
    () => resolvePeftConfig(json, model, 64),
    (e: unknown) => e instanceof AdapterError && e.code === code && (!pattern || pattern.test(e.message)),
  );
}

describe('PEFT adapter_config.json resolution', () => {
  test('list targets adapt those projections in every layer with scale alpha/r', () => {
    const specs = resolvePeftConfig(cfg({}), model, 64);
    assert.deepEqual(
      specs.map((s) => `${s.layer}.${s.proj}`),
      ['0.q_proj', '0.v_proj', '1.q_proj', '1.v_proj', '2.q_proj', '2.v_proj'],
    );
    assert.ok(specs.every((s) => s.rank === 8 && s.scale === 2));
  });

  test('use_rslora scales by alpha/sqrt(r)', () => {
    const [s] = resolvePeftConfig(cfg({ use_rslora: true, r: 16, lora_alpha: 8 }), model, 64);
    assert.equal(s.scale, 8 / 4);
  });

  test('layers_to_transform limits the layers (int and list)', () => {
    assert.deepEqual([...new Set(resolvePeftConfig(cfg({ layers_to_transform: [0, 2] }), model, 64).map((s) => s.layer))], [0, 2]);
    assert.deepEqual([...new Set(resolvePeftConfig(cfg({ layers_to_transform: 1 }), model, 64).map((s) => s.layer))], [1]);
    assert.deepEqual(
      [...new Set(resolvePeftConfig(cfg({ layers_to_transform: [1], layers_pattern: 'layers' }), model, 64).map((s) => s.layer))],
      [1],
    );
  });

  test('rank_pattern and alpha_pattern override per module, first matching key wins', () => {
    const specs = resolvePeftConfig(
      cfg({
        rank_pattern: { 'layers.1.self_attn.q_proj': 4, v_proj: 2 },
        alpha_pattern: { 'model.layers.2.self_attn.v_proj': 10 },
      }),
      model,
      64,
    );
    const by = new Map(specs.map((s) => [`${s.layer}.${s.proj}`, s]));
    assert.equal(by.get('1.q_proj')!.rank, 4);
    assert.equal(by.get('1.q_proj')!.scale, 16 / 4);
    assert.equal(by.get('0.q_proj')!.rank, 8);
    assert.equal(by.get('0.v_proj')!.rank, 2);
    assert.equal(by.get('2.v_proj')!.scale, 10 / 2);
  });

  test('a regex string target is matched against the whole module path', () => {
    const specs = resolvePeftConfig(cfg({ target_modules: '.*\\.layers\\.0\\..*(gate|up)_proj' }), model, 64);
    assert.deepEqual(specs.map((s) => `${s.layer}.${s.proj}`), ['0.gate_proj', '0.up_proj']);
  });

  test('all-linear adapts all seven projections', () => {
    assert.equal(resolvePeftConfig(cfg({ target_modules: 'all-linear' }), model, 64).length, 7 * 3);
  });

  test('exclude_modules removes matching modules', () => {
    const specs = resolvePeftConfig(cfg({ exclude_modules: ['model.layers.0.self_attn.q_proj'] }), model, 64);
    assert.ok(!specs.some((s) => s.layer === 0 && s.proj === 'q_proj'));
  });

  test('refuses DoRA, bias, fan_in_fan_out and modules_to_save with ADAPTER_UNSUPPORTED', () => {
    rejects(cfg({ use_dora: true }), 'ADAPTER_UNSUPPORTED', /DoRA/);
    rejects(cfg({ bias: 'all' }), 'ADAPTER_UNSUPPORTED', /bias/);
    rejects(cfg({ fan_in_fan_out: true }), 'ADAPTER_UNSUPPORTED', /fan_in_fan_out/);
    rejects(cfg({ modules_to_save: ['lm_head'] }), 'ADAPTER_UNSUPPORTED', /modules_to_save/);
    rejects(cfg({ peft_type: 'IA3' }), 'ADAPTER_UNSUPPORTED', /IA3/);
  });

  test('refuses modules the model does not have, naming them', () => {
    rejects(cfg({ target_modules: ['q_proj', 'c_attn'] }), 'ADAPTER_MODULE_UNKNOWN', /c_attn/);
    rejects(cfg({ target_modules: ['lm_head'] }), 'ADAPTER_MODULE_UNKNOWN', /lm_head/);
  });

  test('refuses a rank over the configured maximum, saying both numbers', () => {
    rejects(cfg({ r: 128 }), 'ADAPTER_RANK_TOO_LARGE', /128.*64/);
    rejects(cfg({ rank_pattern: { q_proj: 96 } }), 'ADAPTER_RANK_TOO_LARGE', /96.*64/);
  });

  test('refuses a config that is not a LoRA config', () => {
    rejects({ r: 'eight' }, 'ADAPTER_CONFIG_INVALID');
    rejects(cfg({ target_modules: undefined }), 'ADAPTER_CONFIG_INVALID', /target_modules/);
  });

  test('a pattern that is not a valid regular expression is ADAPTER_CONFIG_INVALID naming the field, not a crash', () => {
    rejects(cfg({ target_modules: '[' }), 'ADAPTER_CONFIG_INVALID', /target_modules: "\[" is not a valid regular expression/);
    rejects(cfg({ exclude_modules: 'a)(' }), 'ADAPTER_CONFIG_INVALID', /exclude_modules/);
    rejects(cfg({ rank_pattern: { '(': 4 } }), 'ADAPTER_CONFIG_INVALID', /rank_pattern: "\("/);
    rejects(cfg({ alpha_pattern: { 'q_proj)': 4 } }), 'ADAPTER_CONFIG_INVALID', /alpha_pattern/);
    rejects(cfg({ layers_to_transform: [0], layers_pattern: 'layers(' }), 'ADAPTER_CONFIG_INVALID', /layers_pattern/);
  });
});
