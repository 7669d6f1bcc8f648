import * as tf from '@tensorflow/tfjs-core';
import { resolveBackend } from '../../src/model/backend/backend.js';
import { LoraAdapter, loraModuleKey, type LoraModuleWeights } from '../../src/model/lora/lora-adapter.js';
import { LlamaModel } from '../../src/model/forward/llama-model.js';
import { llamaWeightsFromArrays, projectionShape, type ProjectionName } from '../../src/model/architecture/llama-weights.js';
import { parseModelConfig } from '../../src/model/architecture/model-config.js';
import { randomLlamaWeights, randomLoraWeights } from '../../src/model/synthetic/random-weights.js';
import type { ReferenceLora } from '../reference/llama-reference.js';

export async function useWasm(): Promise<void> {
  await resolveBackend('wasm');
}

/** Tiny configs covering the attention layouts and RoPE variants the engine must match. */
export const TINY_CONFIGS: Record<string, Record<string, unknown>> = {
  mha: base({ num_attention_heads: 4, num_key_value_heads: 4 }),
  gqa: base({ num_attention_heads: 4, num_key_value_heads: 2 }),
  mqa: base({ num_attention_heads: 4, num_key_value_heads: 1 }),
  tied: base({ num_attention_heads: 4, num_key_value_heads: 2, tie_word_embeddings: true }),
  llama3Rope: base({
    num_attention_heads: 4,
    num_key_value_heads: 2,
    rope_theta: 500000,
    // at head_dim 8 and θ=5e5 the wavelengths are ~6, ~167, ~4443, ~1.2e5: one high band, one
    // interpolated (medium) band with these factors, two scaled bands
    rope_scaling: { rope_type: 'llama3', factor: 8, low_freq_factor: 1, high_freq_factor: 4, original_max_position_embeddings: 512 },
  }),
  linearRope: base({ num_attention_heads: 2, num_key_value_heads: 1, rope_scaling: { type: 'linear', factor: 4 } }),
  qwen2Bias: base({ architectures: ['Qwen2ForCausalLM'], model_type: 'qwen2', num_attention_heads: 4, num_key_value_heads: 2 }),
  mistralWindow: base({ architectures: ['MistralForCausalLM'], model_type: 'mistral', num_attention_heads: 4, num_key_value_heads: 2, sliding_window: 4 }),
  headDim: base({ num_attention_heads: 4, num_key_value_heads: 2, head_dim: 12 }),
};

function base(over: Record<string, unknown>): Record<string, unknown> {
  return {
    architectures: ['LlamaForCausalLM'],
    model_type: 'llama',
    hidden_size: 32,
    intermediate_size: 48,
    num_hidden_layers: 2,
    vocab_size: 61,
    rms_norm_eps: 1e-5,
    rope_theta: 10000,
    max_position_embeddings: 256,
    tie_word_embeddings: false,
    hidden_act: 'silu',
    bos_token_id: 1,
    eos_token_id: 2,
    ...over,
  };
}

export function toF64(m: Map<string, Float32Array>): Map<string, Float64Array> {
  return new Map([...m].map(([k, v]) => [k, Float64Array.from(v)]));
}

export function memoryModel(configJson: Record<string, unknown>, seed: number): { model: LlamaModel; weights: Map<string, Float32Array> } {
  const weights = randomLlamaWeights(configJson, seed);
  const config = parseModelConfig(configJson);
  return { model: new LlamaModel(config, llamaWeightsFromArrays(config, weights)), weights };
}

export interface TestAdapterSpec {
  id: string;
  targets: ProjectionName[];
  rank: number;
  scale: number;
  layers?: number[];
}

/** A LoRA adapter built straight in memory, plus the same weights for the float64 reference. */
export function memoryAdapter(configJson: Record<string, unknown>, spec: TestAdapterSpec, seed: number): { adapter: LoraAdapter; reference: ReferenceLora } {
  const config = parseModelConfig(configJson);
  const mods: { modulePath: string; proj: ProjectionName; rank: number; layer: number }[] = [];
  for (let l = 0; l < config.numLayers; l++) {
    if (spec.layers && !spec.layers.includes(l)) continue;
    for (const proj of spec.targets) {
      const block = proj.startsWith('gate') || proj.startsWith('up') || proj.startsWith('down') ? 'mlp' : 'self_attn';
      mods.push({ modulePath: `model.layers.${l}.${block}.${proj}`, proj, rank: spec.rank, layer: l });
    }
  }
  const w = randomLoraWeights(configJson, mods, seed, 0.3);
  const modules = new Map<string, LoraModuleWeights>();
  const reference: ReferenceLora = { modules: new Map() };
  for (const m of mods) {
    const a = w.get(`base_model.model.${m.modulePath}.lora_A.weight`)!;
    const b = w.get(`base_model.model.${m.modulePath}.lora_B.weight`)!;
    const { inFeatures, outFeatures } = projectionShape(config, m.proj);
    modules.set(loraModuleKey(m.layer, m.proj), {
      aT: tf.transpose(tf.tensor2d(a.data, [m.rank, inFeatures])),
      bT: tf.transpose(tf.tensor2d(b.data, [outFeatures, m.rank])),
      rank: m.rank,
      scale: spec.scale,
    });
    reference.modules.set(m.modulePath, { a: Float64Array.from(a.data), b: Float64Array.from(b.data), rank: m.rank, scale: spec.scale });
  }
  return { adapter: new LoraAdapter(spec.id, modules, new Set(spec.targets)), reference };
}

export function maxAbsDiff(a: ArrayLike<number>, b: ArrayLike<number>): number {
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i] - b[i]));
  return m;
}
