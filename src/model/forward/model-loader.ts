import * as tf from '@tensorflow/tfjs-core';
import { ModelFormatError } from '../../errors.js';
import { openCheckpoint } from '../formats/checkpoint.js';
import { LlamaModel } from './llama-model.js';
import { disposePartial, expectedTensors, type LayerWeights, type LlamaWeights } from '../architecture/llama-weights.js';
import { readModelConfig, type ModelConfig } from '../architecture/model-config.js';

function sameShape(a: readonly number[], b: readonly number[]): boolean {
  return a.length === b.length && a.every((v, i) => v === b[i]);
}

/**
 * Loads and checks every weight the config implies from the folder's safetensors files.
 * All checks that can fail run before any tensor is created, so a bad folder never leaves
 * a half-built model behind; if reading fails midway, what was created is disposed.
 */
export async function loadLlamaWeights(modelDir: string, config: ModelConfig): Promise<LlamaWeights> {
  const checkpoint = await openCheckpoint(modelDir);
  const sink = { layers: [] as Partial<LayerWeights>[] } as Partial<LlamaWeights> & { layers: Partial<LayerWeights>[] };
  const expected = expectedTensors(config, sink);
  const created: tf.Tensor[] = [];
  try {
    for (const [name, exp] of expected) {
      const entry = checkpoint.entry(name);
      if (!entry) {
        throw new ModelFormatError('TENSOR_MISSING', modelDir, `tensor '${name}' is missing from the checkpoint`);
      }
      if (!sameShape(entry.shape, exp.shape)) {
        throw new ModelFormatError(
          'TENSOR_SHAPE_MISMATCH',
          entry.file,
          `tensor '${name}' has shape [${entry.shape.join(', ')}] but config.json implies [${exp.shape.join(', ')}]`,
        );
      }
    }
    await checkpoint.readTensors((entry, data) => {
      const exp = expected.get(entry.name);
      if (!exp) return;
      created.push(exp.load(data));
    }, new Set(expected.keys()));
  } catch (err) {
    for (const t of created) t.dispose();
    disposePartial(sink);
    throw err;
  } finally {
    await checkpoint.close();
  }
  if (config.tieWordEmbeddings) sink.lmHeadT = tf.transpose(sink.embed!);
  return sink as LlamaWeights;
}


/** Reads config.json and the checkpoint of a Hugging Face model folder. */
export async function loadLlamaModel(modelDir: string): Promise<LlamaModel> {
  const config = await readModelConfig(modelDir);
  return new LlamaModel(config, await loadLlamaWeights(modelDir, config));
}
