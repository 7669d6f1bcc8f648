import { FederationError } from '../../errors.js';
import { PROJECTIONS, type ProjectionName } from '../../model/architecture/llama-weights.js';
import { encodeSafetensors, type TensorToWrite } from '../../model/formats/safetensors.js';
import { peftConfigJson } from '../../model/synthetic/hf-folder-writer.js';
import { factorShape, peftTensorName, type FactorSet, type FedMethod, type ModuleFactors } from '../lora-factors.js';
import { matmul, matrix, toFloat32 } from '../low-rank.js';
import { requireFactor } from './client-update.js';

/** The job's LoRA settings as the served adapter needs them. */
export interface ServedLora {
  alpha: number;
  useRslora: boolean;
  /** the job's rank (fedavg, ffa); flora and fedsb take each module's own */
  r: number;
}

/** The two files of a standard PEFT LoRA adapter. */
export interface ServedAdapterFiles {
  /** adapter_config.json */
  config: Buffer;
  /** adapter_model.safetensors */
  weights: Buffer;
}

/**
 * The global state as a standard PEFT LoRA adapter, y = x·Wᵀ + s·(x·Aᵀ)·Bᵀ:
 *   fedavg, ffa:  lora_A = A, lora_B = B, r and lora_alpha from the job, use_rslora as given
 *                 (s = α/r or α/√r, the scale the clients trained with)
 *   flora:        lora_A, lora_B = the stacked factors (scale already folded in),
 *                 r = lora_alpha = the stacked rank, use_rslora false  → s = 1
 *   fedsb:        lora_A = A, lora_B = B·R̄ [out, r], r = lora_alpha = rank  → s = 1, ΔW = B·R̄·A
 * target_modules names the projections present (with layers_to_transform the layers present),
 * or the module paths themselves when the modules are not every projection × every layer.
 * Modules whose rank differs from `r` get rank_pattern (and, where s = 1 must hold,
 * alpha_pattern) entries.
 */
export function toServedAdapter(method: FedMethod, global: FactorSet, lora: ServedLora): ServedAdapterFiles {
  if (global.size === 0) throw new FederationError('FED_ROUND_NOT_FOUND', `the ${method} global adapter has no modules yet: nothing to serve before the first aggregated round`);
  const modules = [...global.values()];
  const unitScale = method === 'flora' || method === 'fedsb';
  const r = unitScale ? mostCommon(modules.map((m) => m.rank)) : lora.r;
  const rankPattern: Record<string, number> = {};
  const alphaPattern: Record<string, number> = {};
  for (const m of modules) {
    if (m.rank === r) continue;
    rankPattern[m.modulePath] = m.rank;
    if (unitScale) alphaPattern[m.modulePath] = m.rank;
  }
  const projs = PROJECTIONS.filter((p) => modules.some((m) => m.proj === p));
  const layers = [...new Set(modules.map((m) => m.layer))].sort((x, y) => x - y);
  const isProduct = projs.length * layers.length === modules.length;
  const json = peftConfigJson({
    r,
    loraAlpha: unitScale ? r : lora.alpha,
    targetModules: projs as ProjectionName[],
    useRslora: unitScale ? false : lora.useRslora,
    layersToTransform: isProduct ? layers : undefined,
    rankPattern,
    alphaPattern,
  });
  if (!isProduct) json.target_modules = modules.map((m) => m.modulePath);
  const tensors: TensorToWrite[] = [];
  for (const m of modules) {
    const owner = `${method} global`;
    const a = requireFactor(m, 'a', owner);
    const b = method === 'fedsb' ? fedsbServedB(m, requireFactor(m, 'b', owner), requireFactor(m, 'r', owner)) : requireFactor(m, 'b', owner);
    tensors.push({ name: peftTensorName(m.modulePath, 'A'), shape: factorShape(m, 'A'), dtype: 'F32', data: a });
    tensors.push({ name: peftTensorName(m.modulePath, 'B'), shape: factorShape(m, 'B'), dtype: 'F32', data: b });
  }
  return { config: Buffer.from(JSON.stringify(json, null, 2)), weights: encodeSafetensors(tensors, { format: 'pt' }) };
}

/** lora_B' = B·R̄ [out, r], so PEFT's s·B'·A (s = 1) is Fed-SB's B·R̄·A. */
function fedsbServedB(m: ModuleFactors, b: Float32Array, r: Float32Array): Float32Array {
  return toFloat32(matmul(matrix(m.outFeatures, m.rank, b), matrix(m.rank, m.rank, r)));
}

/** The most frequent value (the largest among ties). */
function mostCommon(values: number[]): number {
  const counts = new Map<number, number>();
  for (const v of values) counts.set(v, (counts.get(v) ?? 0) + 1);
  let best = values[0];
  for (const [v, n] of counts) {
    const bn = counts.get(best)!;
    if (n > bn || (n === bn && v > best)) best = v;
  }
  return best;
}
