import * as tf from '@tensorflow/tfjs-core';
import { ModelFormatError } from '../../errors.js';
import type { ModelConfig } from './model-config.js';

export const PROJECTIONS = ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'] as const;
export type ProjectionName = (typeof PROJECTIONS)[number];

/** Module path of a projection inside the HF model, as PEFT names it (`model.layers.3.self_attn.q_proj`). */
export function projectionModulePath(layer: number, proj: ProjectionName): string {
  const block = proj === 'gate_proj' || proj === 'up_proj' || proj === 'down_proj' ? 'mlp' : 'self_attn';
  return `model.layers.${layer}.${block}.${proj}`;
}

/** [in, out] features of a projection; the stored HF weight is [out, in]. */
export function projectionShape(config: ModelConfig, proj: ProjectionName): { inFeatures: number; outFeatures: number } {
  const h = config.hiddenSize;
  const q = config.numHeads * config.headDim;
  const kv = config.numKvHeads * config.headDim;
  switch (proj) {
    case 'q_proj':
      return { inFeatures: h, outFeatures: q };
    case 'k_proj':
    case 'v_proj':
      return { inFeatures: h, outFeatures: kv };
    case 'o_proj':
      return { inFeatures: q, outFeatures: h };
    case 'gate_proj':
    case 'up_proj':
      return { inFeatures: h, outFeatures: config.intermediateSize };
    case 'down_proj':
      return { inFeatures: config.intermediateSize, outFeatures: h };
  }
}

function projectionHasBias(config: ModelConfig, proj: ProjectionName): boolean {
  if (proj === 'q_proj' || proj === 'k_proj' || proj === 'v_proj') return config.qkvBias;
  if (proj === 'o_proj') return config.oBias;
  return config.mlpBias;
}

export interface Projection {
  /** Weight transposed to [in, out]: on the wasm backend matMul with transposeB is ~12× slower. */
  wT: tf.Tensor2D;
  bias?: tf.Tensor1D;
}

export interface LayerWeights {
  inputNorm: tf.Tensor1D;
  postAttentionNorm: tf.Tensor1D;
  proj: Record<ProjectionName, Projection>;
}

export interface LlamaWeights {
  /** [vocab, hidden], read by gather. */
  embed: tf.Tensor2D;
  /** [hidden, vocab]: lm_head.weight transposed, or embed transposed when tied. */
  lmHeadT: tf.Tensor2D;
  finalNorm: tf.Tensor1D;
  layers: LayerWeights[];
}

interface Expected {
  shape: number[];
  assign: (t: tf.Tensor) => void;
}

/** Every tensor name the config implies, with its HF shape and where the loaded tensor goes. */
export function expectedTensors(config: ModelConfig, sink: Partial<LlamaWeights> & { layers: Partial<LayerWeights>[] }): Map<string, Expected> {
  const m = new Map<string, Expected>();
  const h = config.hiddenSize;
  m.set('model.embed_tokens.weight', { shape: [config.vocabSize, h], assign: (t) => (sink.embed = t as tf.Tensor2D) });
  m.set('model.norm.weight', { shape: [h], assign: (t) => (sink.finalNorm = t as tf.Tensor1D) });
  if (!config.tieWordEmbeddings) {
    m.set('lm_head.weight', { shape: [config.vocabSize, h], assign: (t) => (sink.lmHeadT = transposeAndDispose(t)) });
  }
  for (let l = 0; l < config.numLayers; l++) {
    const proj: Partial<Record<ProjectionName, Partial<Projection>>> = {};
    const layer = { proj } as Partial<LayerWeights>;
    sink.layers.push(layer);
    m.set(`model.layers.${l}.input_layernorm.weight`, { shape: [h], assign: (t) => (layer.inputNorm = t as tf.Tensor1D) });
    m.set(`model.layers.${l}.post_attention_layernorm.weight`, {
      shape: [h],
      assign: (t) => (layer.postAttentionNorm = t as tf.Tensor1D),
    });
    const layerProj = proj;
    for (const proj of PROJECTIONS) {
      const { inFeatures, outFeatures } = projectionShape(config, proj);
      const p: Partial<Projection> = {};
      layerProj[proj] = p;
      const path = projectionModulePath(l, proj);
      m.set(`${path}.weight`, { shape: [outFeatures, inFeatures], assign: (t) => (p.wT = transposeAndDispose(t)) });
      if (projectionHasBias(config, proj)) {
        m.set(`${path}.bias`, { shape: [outFeatures], assign: (t) => (p.bias = t as tf.Tensor1D) });
      }
    }
  }
  return m;
}

function transposeAndDispose(t: tf.Tensor): tf.Tensor2D {
  const out = tf.transpose(t as tf.Tensor2D);
  t.dispose();
  return out;
}

export function disposePartial(w: Partial<LlamaWeights> & { layers?: Partial<LayerWeights>[] }): void {
  const all: (tf.Tensor | undefined)[] = [w.embed, w.lmHeadT, w.finalNorm];
  for (const layer of w.layers ?? []) {
    all.push(layer.inputNorm, layer.postAttentionNorm);
    for (const p of Object.values(layer.proj ?? {})) all.push(p?.wT, p?.bias);
  }
  for (const t of all) if (t && !t.isDisposed) t.dispose();
}

export function disposeLlamaWeights(w: LlamaWeights): void {
  disposePartial(w);
}

/** Builds weights from host arrays in HF layout (used by the benchmark and tests' in-memory models). */
export function llamaWeightsFromArrays(config: ModelConfig, arrays: Map<string, Float32Array>): LlamaWeights {
  const sink = { layers: [] as Partial<LayerWeights>[] } as Partial<LlamaWeights> & { layers: Partial<LayerWeights>[] };
  const expected = expectedTensors(config, sink);
  for (const [name, exp] of expected) {
    const data = arrays.get(name);
    if (!data) throw new ModelFormatError('TENSOR_MISSING', '(memory)', `tensor '${name}' is missing`);
    exp.assign(tf.tensor(data, exp.shape, 'float32'));
  }
  if (config.tieWordEmbeddings) sink.lmHeadT = tf.transpose(sink.embed!);
  return sink as LlamaWeights;
}

/** Names and HF shapes of every tensor a checkpoint for this config holds. */
export function checkpointLayout(config: ModelConfig): Map<string, number[]> {
  const sink = { layers: [] as Partial<LayerWeights>[] } as Partial<LlamaWeights> & { layers: Partial<LayerWeights>[] };
  return new Map([...expectedTensors(config, sink)].map(([name, e]) => [name, e.shape]));
}
