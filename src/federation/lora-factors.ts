import type { ProjectionName } from '../model/architecture/llama-weights.js';

/** The four federated LoRA methods (see README, "Federation"). */
export const FED_METHODS = ['fedavg', 'ffa', 'flora', 'fedsb'] as const;
export type FedMethod = (typeof FED_METHODS)[number];

/**
 * One adapted projection's LoRA factors on the host, in PEFT's stored layout (row-major):
 *   ΔW = s · B · A                (fedavg, ffa, flora)      A = lora_A [rank, in], B = lora_B [out, rank]
 *   ΔW = s · B · R · A            (fedsb)                   R = lora_R [rank, rank]
 * Which of a / b / r are present depends on what a message carries: a client's update holds
 * only what it trained (ffa: b; fedsb: r), a global state holds everything the next round needs.
 */
export interface ModuleFactors {
  /** `model.layers.{layer}.{self_attn|mlp}.{proj}`, as in PEFT key names. */
  modulePath: string;
  layer: number;
  proj: ProjectionName;
  inFeatures: number;
  outFeatures: number;
  rank: number;
  a?: Float32Array;
  b?: Float32Array;
  r?: Float32Array;
}

/** Factors of every adapted module, keyed by modulePath, in the model's module order. */
export type FactorSet = Map<string, ModuleFactors>;

/** PEFT's tensor name for a factor: `base_model.model.<modulePath>.lora_<A|B|R>.weight`. */
export function peftTensorName(modulePath: string, which: 'A' | 'B' | 'R'): string {
  return `base_model.model.${modulePath}.lora_${which}.weight`;
}

/** Shape of a factor as stored: A [rank, in], B [out, rank], R [rank, rank]. */
export function factorShape(m: Pick<ModuleFactors, 'rank' | 'inFeatures' | 'outFeatures'>, which: 'A' | 'B' | 'R'): [number, number] {
  return which === 'A' ? [m.rank, m.inFeatures] : which === 'B' ? [m.outFeatures, m.rank] : [m.rank, m.rank];
}
