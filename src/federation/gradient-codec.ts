import { UpdateRejectedError } from '../errors.js';
import { encodeSafetensors, SafetensorsReader } from '../model/formats/safetensors.js';
import type { ModuleFactors } from './lora-factors.js';

/**
 * Fed-SB's initialisation upload: each client's mean gradient of the loss w.r.t. the FULL
 * weight W [out, in] of every target module, `base_model.model.<modulePath>.grad.weight`, F32,
 * with metadata {kind: fedsb-gradient, job, round: 0, client, numExamples, trainLoss}.
 * This is the one upload of a job that is not a LoRA factor: out·in floats per module (the
 * demo model's q_proj: 64·64), once, before round 1. It is not noised (no DP in this version).
 */
export interface GradientMeta {
  job: string;
  round: number;
  client: string;
  numExamples: number;
  trainLoss: number;
}

const gradName = (modulePath: string) => `base_model.model.${modulePath}.grad.weight`;

export function encodeGradients(meta: GradientMeta, grads: ReadonlyMap<string, Float32Array>, modules: readonly ModuleFactors[]): Buffer {
  return encodeSafetensors(
    modules.map((m) => ({ name: gradName(m.modulePath), shape: [m.outFeatures, m.inFeatures], dtype: 'F32' as const, data: grads.get(m.modulePath)! })),
    { format: 'pt', kind: 'fedsb-gradient', job: meta.job, round: String(meta.round), client: meta.client, method: 'fedsb', numExamples: String(meta.numExamples), trainLoss: String(meta.trainLoss) },
  );
}

/** Checks a gradient upload against the job (metadata, names, shapes, finiteness); rejections name their reason. */
export async function decodeGradients(bytes: Uint8Array, expect: { job: string; round: number; client: string; modules: readonly ModuleFactors[] }): Promise<{ meta: GradientMeta; grads: Map<string, Float32Array> }> {
  let reader: SafetensorsReader;
  try {
    reader = await SafetensorsReader.fromBytes(bytes, `gradient of client '${expect.client}'`);
  } catch (err) {
    throw new UpdateRejectedError('not_safetensors', (err as Error).message, { cause: err });
  }
  try {
    const md = reader.metadata;
    for (const [k, want] of [['kind', 'fedsb-gradient'], ['job', expect.job], ['round', String(expect.round)], ['client', expect.client]] as const) {
      if (md[k] !== want) throw new UpdateRejectedError('metadata_mismatch', `gradient upload: ${k} is '${md[k]}', expected '${want}'`);
    }
    const numExamples = Number(md.numExamples);
    if (!Number.isSafeInteger(numExamples) || numExamples <= 0) throw new UpdateRejectedError('num_examples_invalid', `numExamples '${md.numExamples}' is not a positive integer`);
    const trainLoss = Number(md.trainLoss);
    if (!Number.isFinite(trainLoss) || trainLoss < 0) throw new UpdateRejectedError('train_loss_invalid', `trainLoss '${md.trainLoss}' is not a finite non-negative number`);
    const byName = new Map(expect.modules.map((m) => [gradName(m.modulePath), m]));
    for (const e of reader.entries()) {
      const m = byName.get(e.name);
      if (!m) throw new UpdateRejectedError('unexpected_tensor', `gradient upload: tensor '${e.name}' is not a target module's gradient`);
      if (e.shape.length !== 2 || e.shape[0] !== m.outFeatures || e.shape[1] !== m.inFeatures) {
        throw new UpdateRejectedError('shape_mismatch', `gradient upload: '${e.name}' has shape [${e.shape.join(', ')}], expected [${m.outFeatures}, ${m.inFeatures}]`);
      }
    }
    const grads = new Map<string, Float32Array>();
    await reader.readTensors((e, data) => {
      for (let i = 0; i < data.length; i++) if (!Number.isFinite(data[i])) throw new UpdateRejectedError('not_finite', `gradient upload: '${e.name}' holds ${data[i]} at index ${i}`);
      grads.set(byName.get(e.name)!.modulePath, data);
    });
    for (const m of expect.modules) if (!grads.has(m.modulePath)) throw new UpdateRejectedError('missing_tensor', `gradient upload: '${gradName(m.modulePath)}' is missing`);
    return { meta: { job: md.job, round: expect.round, client: md.client, numExamples, trainLoss }, grads };
  } catch (err) {
    if (err instanceof UpdateRejectedError) throw err;
    throw new UpdateRejectedError('not_safetensors', (err as Error).message, { cause: err });
  } finally {
    await reader.close();
  }
}
