import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { ModelFormatError } from '../../../src/errors.js';
import { parseModelConfig } from '../../../src/model/architecture/model-config.js';
import { ropeInverseFrequencies } from '../../../src/model/forward/rope.js';

const llama = {
  architectures: ['LlamaForCausalLM'],
  hidden_size: 64,
  intermediate_size: 128,
  num_hidden_layers: 2,
  num_attention_heads: 8,
  vocab_size: 100,
};

function rejects(json: Record<string, unknown>, code: string, pattern?: RegExp): void {
  assert.throws(
    () => parseModelConfig(json),
    (e: unknown) => e instanceof ModelFormatError && e.code === code && (!pattern || pattern.test(e.message)),
  );
}

describe('config.json', () => {
  test('applies transformers defaults: kv heads = heads, head_dim = hidden/heads, eps, theta, untied', () => {
    const c = parseModelConfig(llama);
    assert.equal(c.numKvHeads, 8);
    assert.equal(c.headDim, 8);
    assert.equal(c.rmsNormEps, 1e-6);
    assert.equal(c.ropeTheta, 10000);
    assert.equal(c.tieWordEmbeddings, false);
    assert.equal(c.qkvBias, false);
    assert.deepEqual(c.ropeScaling, { type: 'default' });
  });

  test('Qwen2 has q/k/v bias but no o_proj bias; Mistral keeps its sliding window', () => {
    const q = parseModelConfig({ ...llama, architectures: ['Qwen2ForCausalLM'] });
    assert.equal(q.qkvBias, true);
    assert.equal(q.oBias, false);
    assert.equal(parseModelConfig({ ...llama, architectures: ['MistralForCausalLM'], sliding_window: 4096 }).slidingWindow, 4096);
    assert.equal(parseModelConfig({ ...llama, sliding_window: 4096 }).slidingWindow, undefined);
  });

  test('linear rope scaling divides every frequency by the factor', () => {
    const plain = ropeInverseFrequencies(parseModelConfig(llama));
    const scaled = ropeInverseFrequencies(parseModelConfig({ ...llama, rope_scaling: { type: 'linear', factor: 4 } }));
    plain.forEach((f, i) => assert.ok(Math.abs(scaled[i] - f / 4) < 1e-15));
  });

  test('llama3 rope scaling keeps high frequencies, divides low ones and interpolates between', () => {
    const c = parseModelConfig({
      ...llama,
      num_attention_heads: 1,
      rope_theta: 500000,
      rope_scaling: { rope_type: 'llama3', factor: 8, low_freq_factor: 1, high_freq_factor: 4, original_max_position_embeddings: 8192 },
    });
    const plain = ropeInverseFrequencies({ ...c, ropeScaling: { type: 'default' } });
    const scaled = ropeInverseFrequencies(c);
    let kept = 0;
    let divided = 0;
    let between = 0;
    plain.forEach((f, i) => {
      const wl = (2 * Math.PI) / f;
      if (wl < 8192 / 4) {
        assert.equal(scaled[i], f);
        kept++;
      } else if (wl > 8192) {
        assert.ok(Math.abs(scaled[i] - f / 8) < 1e-18);
        divided++;
      } else {
        assert.ok(scaled[i] < f && scaled[i] > f / 8);
        between++;
      }
    });
    assert.ok(kept > 0 && divided > 0 && between > 0, `${kept}/${between}/${divided}`);
  });

  test('refuses rope scaling types it does not implement', () => {
    rejects({ ...llama, rope_scaling: { type: 'yarn', factor: 4 } }, 'ROPE_SCALING_UNSUPPORTED', /yarn/);
    rejects({ ...llama, rope_scaling: { rope_type: 'dynamic', factor: 2 } }, 'ROPE_SCALING_UNSUPPORTED', /dynamic/);
  });

  test('refuses other architectures, non-silu activations and inconsistent heads', () => {
    rejects({ ...llama, architectures: ['GPT2LMHeadModel'] }, 'MODEL_ARCHITECTURE_UNSUPPORTED', /GPT2/);
    rejects({ ...llama, hidden_act: 'gelu' }, 'MODEL_CONFIG_INVALID', /gelu/);
    rejects({ ...llama, num_key_value_heads: 3 }, 'MODEL_CONFIG_INVALID', /multiple/);
    rejects({ ...llama, hidden_size: undefined }, 'MODEL_CONFIG_INVALID', /hidden_size/);
  });
});
