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
  /** Shape as stored in the checkpoint (HF layout). */
  shape: number[];
  /** Makes the tensor from the checkpoint's values and puts it in its place; returns it. */
  load: (data: Float32Array) => tf.Tensor;
}

/** A tensor in the checkpoint's layout. */
function asIs(shape: number[], put: (t: tf.Tensor) => void): Expected {
  return { shape, load: (data) => { const t = tf.tensor(data, shape, 'float32'); put(t); return t; } };
}

/**
 * A [rows, cols] weight stored transposed, [cols, rows]. Transposed on the host, before the
 * tensor exists: transposing on the device held both copies at once, and the wasm heap keeps
 * its high-water mark (100 MB more at startup for a 50k-vocabulary lm_head).
 */
function transposed(shape: [number, number], put: (t: tf.Tensor2D) => void): Expected {
  return {
    shape,
    load: (data) => {
      const t = tf.tensor2d(transposeHost(data, shape[0], shape[1]), [shape[1], shape[0]]);
      put(t);
      return t;
    },
  };
}

/** out[j, i] = a[i, j] for a [rows, cols], in 32×32 tiles so both sides stay in cache. */
export function transposeHost(a: Float32Array, rows: number, cols: number): Float32Array {
  const out = new Float32Array(rows * cols);
  const B = 32;
  for (let i0 = 0; i0 < rows; i0 += B) {
    const i1 = Math.min(rows, i0 + B);
    for (let j0 = 0; j0 < cols; j0 += B) {
      const j1 = Math.min(cols, j0 + B);
      for (let i = i0; i < i1; i++) {
        const row = i * cols;
        for (let j = j0; j < j1; j++) out[j * rows + i] = a[row + j];
      }
    }
  }
  return out;
}

/** Every tensor name the config implies, with its HF shape and where the loaded tensor goes. */
export function expectedTensors(config: ModelConfig, sink: Partial<LlamaWeights> & { layers: Partial<LayerWeights>[] }): Map<string, Expected> {
  const m = new Map<string, Expected>();
  const h = config.hiddenSize;
  m.set('model.embed_tokens.weight', asIs([config.vocabSize, h], (t) => (sink.embed = t as tf.Tensor2D)));
  m.set('model.norm.weight', asIs([h], (t) => (sink.finalNorm = t as tf.Tensor1D)));
  if (!config.tieWordEmbeddings) {
    m.set('lm_head.weight', transposed([config.vocabSize, h], (t) => (sink.lmHeadT = t)));
  }
  for (let l = 0; l < config.numLayers; l++) {
    const proj: Partial<Record<ProjectionName, Partial<Projection>>> = {};
    const layer = { proj } as Partial<LayerWeights>;
    sink.layers.push(layer);
    m.set(`model.layers.${l}.input_layernorm.weight`, asIs([h], (t) => (layer.inputNorm = t as tf.Tensor1D)));
    m.set(`model.layers.${l}.post_attention_layernorm.weight`, asIs([h], (t) => (layer.postAttentionNorm = t as tf.Tensor1D)));
    const layerProj = proj;
    for (const proj of PROJECTIONS) {
      const { inFeatures, outFeatures } = projectionShape(config, proj);
      const p: Partial<Projection> = {};
      layerProj[proj] = p;
      const path = projectionModulePath(l, proj);
      m.set(`${path}.weight`, transposed([outFeatures, inFeatures], (t) => (p.wT = t)));
      if (projectionHasBias(config, proj)) {
        m.set(`${path}.bias`, asIs([outFeatures], (t) => (p.bias = t as tf.Tensor1D)));
      }
    }
  }
  return m;
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
    exp.load(data);
  }
  if (config.tieWordEmbeddings) sink.lmHeadT = tf.transpose(sink.embed!);
  return sink as LlamaWeights;
}

/** Names and HF shapes of every tensor a checkpoint for this config holds. */
export function checkpointLayout(config: ModelConfig): Map<string, number[]> {
  const sink = { layers: [] as Partial<LayerWeights>[] } as Partial<LlamaWeights> & { layers: Partial<LayerWeights>[] };
  return new Map([...expectedTensors(config, sink)].map(([name, e]) => [name, e.shape]));
}
