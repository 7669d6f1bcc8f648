import { AdapterError } from '../../errors.js';
import type { LoraModuleSpec } from './peft-config.js';

/**
 * Bounds that keep an adapter's float32 forward finite, checked before it is stored or loaded.
 *
 * A module adds Δy = s·(x·Aᵀ)·Bᵀ. Its gain ‖ΔW‖₂ = ‖s·B·A‖₂ ≤ |s|·‖B‖_F·‖A‖_F (submultiplicative,
 * and the spectral norm is at most the Frobenius norm), computed in float64 in one pass.
 *
 * - MAX_DELTA_GAIN = 1e4 bounds that product. Real adapters sit far below it: PEFT initialises
 *   ‖A‖_F ≈ √(r/3) and B = 0, and trained deltas are of the order of the base weights they
 *   adjust (spectral norms O(1–100)). Under it, the inputs of q/k/v/gate/up being RMS-normalised
 *   (‖x̂‖ ≤ √d·max|γ| ~ 1e2), each adapted projection stays ≲ 1e6, SwiGLU's product ≲ 1e12, down_proj
 *   and o_proj add ≲ 1e16 to the residual stream per layer: even over 100 layers its squared
 *   norm (what the next RMSNorm sums) stays below float32's 3.4e38.
 * - MAX_FACTOR_NORM = 1e6 bounds each of |s|, ‖A‖_F and ‖B‖_F alone, because kernels apply the
 *   three in different orders (s·(x·Aᵀ) then ·Bᵀ natively, (x·Aᵀ)·Bᵀ then ·s on the tfjs path):
 *   every partial product is then ≤ 1e12·‖x‖, so no intermediate overflows either — a delta of
 *   modest gain built from a huge scale and an all-zero B (alpha 1e308 on a fresh adapter) would
 *   compute Inf·0 = NaN.
 *
 * The base weights are not known here (the store holds the model's config only), so this is not
 * a proof for any base model; the serving-side guard (non-finite logits fail the request and mark
 * the version errored) covers what is left.
 */
export const MAX_DELTA_GAIN = 1e4;
export const MAX_FACTOR_NORM = 1e6;

export interface LoraFactors {
  spec: LoraModuleSpec;
  /** lora_A [r, in], row-major. */
  a: Float32Array;
  /** lora_B [out, r], row-major. */
  b: Float32Array;
}

function frobenius(data: Float32Array): number {
  let sum = 0;
  for (let i = 0; i < data.length; i++) sum += data[i] * data[i];
  return Math.sqrt(sum);
}

/** ADAPTER_WEIGHTS_OVERFLOW naming the module and the factor when any bound is exceeded. */
export function checkDeltaBounds(modules: LoraFactors[], weightsFile: string): void {
  for (const { spec, a, b } of modules) {
    const s = Math.abs(spec.scale);
    const normA = frobenius(a);
    const normB = frobenius(b);
    const refuse = (what: string) => {
      throw new AdapterError('ADAPTER_WEIGHTS_OVERFLOW', `${weightsFile}: ${spec.modulePath}: ${what}; its float32 forward could overflow to Inf/NaN`);
    };
    // float32 rounds anything past 3.4e38 to Infinity before any bound would be compared
    if (!Number.isFinite(Math.fround(spec.scale))) refuse(`scale s = ${spec.scale} (lora_alpha over r) is not a finite float32`);
    if (s > MAX_FACTOR_NORM) refuse(`scale s = ${spec.scale} (lora_alpha over r) exceeds ${MAX_FACTOR_NORM}`);
    if (normA > MAX_FACTOR_NORM) refuse(`‖lora_A‖_F = ${normA.toPrecision(4)} exceeds ${MAX_FACTOR_NORM}`);
    if (normB > MAX_FACTOR_NORM) refuse(`‖lora_B‖_F = ${normB.toPrecision(4)} exceeds ${MAX_FACTOR_NORM}`);
    const gain = s * normA * normB;
    if (gain > MAX_DELTA_GAIN) {
      refuse(`the delta's gain bound |s|·‖lora_B‖_F·‖lora_A‖_F = ${spec.scale.toPrecision(4)}·${normB.toPrecision(4)}·${normA.toPrecision(4)} = ${gain.toPrecision(4)} exceeds ${MAX_DELTA_GAIN}`);
    }
  }
}
