import { AdapterError, FederationError } from '../errors.js';
import { projectionShape } from '../model/architecture/llama-weights.js';
import type { ModelConfig } from '../model/architecture/model-config.js';
import { resolvePeftConfig } from '../model/lora/peft-config.js';
import { SeededRandom } from '../model/synthetic/seeded-random.js';
import type { FactorSet, ModuleFactors } from './lora-factors.js';

/**
 * Deterministic LoRA initialisations. Every client and the coordinator derive the same
 * lora_A from the job's seed alone, so A never has to travel (FFA-LoRA freezes it; FedAvg
 * and FLoRA start from it), and all of them agree on which modules exist and in what order.
 */

/** The LoRA a job trains, in PEFT's terms. */
export interface LoraSpec {
  r: number;
  alpha: number;
  /** PEFT `target_modules` (a list of names, or "all-linear"). */
  targetModules: string[] | string;
  useRslora?: boolean;
}

/** PEFT's scaling: s = alpha / r, or alpha / √r with rsLoRA (Kalajdzievski 2023). */
export function loraScale(alpha: number, rank: number, useRslora = false): number {
  return useRslora ? alpha / Math.sqrt(rank) : alpha / rank;
}

/**
 * The adapted modules of a LoRA spec on this model, as factor skeletons (no a/b/r), in the
 * model's order (layer, then q, k, v, o, gate, up, down) — the order resolvePeftConfig walks
 * and FactorSets keep. PEFT's matching rules apply; a module the model lacks is
 * FED_TARGET_MODULE_UNKNOWN, any other refusal FED_JOB_INVALID.
 */
export function moduleSpecsFor(config: ModelConfig, spec: LoraSpec): ModuleFactors[] {
  let resolved;
  try {
    resolved = resolvePeftConfig(
      { peft_type: 'LORA', r: spec.r, lora_alpha: spec.alpha, target_modules: spec.targetModules, use_rslora: spec.useRslora ?? false },
      config,
      Number.MAX_SAFE_INTEGER,
      'lora spec',
    );
  } catch (err) {
    if (!(err instanceof AdapterError)) throw err;
    throw new FederationError(err.code === 'ADAPTER_MODULE_UNKNOWN' ? 'FED_TARGET_MODULE_UNKNOWN' : 'FED_JOB_INVALID', err.message, { cause: err });
  }
  return resolved.map((m) => ({ modulePath: m.modulePath, layer: m.layer, proj: m.proj, ...projectionShape(config, m.proj), rank: m.rank }));
}

/** FNV-1a over the UTF-16 code units of s: a stable 32-bit hash, identical on every machine. */
export function fnv1a(s: string): number {
  let h = 0x811c9dc5;
  for (let i = 0; i < s.length; i++) h = Math.imul(h ^ s.charCodeAt(i), 0x01000193) >>> 0;
  return h;
}

/** murmur3's 32-bit finaliser: every input bit flips each output bit with probability ~½. */
function fmix32(x: number): number {
  x = Math.imul(x ^ (x >>> 16), 0x85ebca6b);
  x = Math.imul(x ^ (x >>> 13), 0xc2b2ae35);
  return (x ^ (x >>> 16)) >>> 0;
}

/** The PRNG seed for one module: mixes all 53 bits of the job seed with the module path's hash. */
export function moduleSeed(seed: number, modulePath: string): number {
  const lo = seed >>> 0;
  const hi = Math.floor(seed / 2 ** 32) >>> 0;
  return fmix32(fmix32(lo) ^ fmix32(hi + 0x9e3779b9) ^ fnv1a(modulePath));
}

/**
 * PEFT's default lora_A: `nn.init.kaiming_uniform_(A, a=√5)` on A [rank, in]. Kaiming's
 * gain for leaky-ReLU slope a is √(2/(1+a²)) = √(1/3), std = gain/√fan_in, and the uniform
 * bound is √3·std, so A ~ U(−1/√in, 1/√in). Row-major [rank, in]; lora_B starts at zero.
 */
export function seededLoraA(seed: number, module: Pick<ModuleFactors, 'modulePath' | 'rank' | 'inFeatures'>): Float32Array {
  const rng = new SeededRandom(moduleSeed(seed, module.modulePath));
  const bound = 1 / Math.sqrt(module.inFeatures);
  const a = new Float32Array(module.rank * module.inFeatures);
  for (let i = 0; i < a.length; i++) a[i] = (2 * rng.next() - 1) * bound;
  return a;
}

/** A fresh PEFT LoRA for these modules: a = seededLoraA(seed, m), b = 0 [out, rank] (so ΔW = 0). */
export function initialLoraFactors(modules: ModuleFactors[], seed: number): FactorSet {
  const set: FactorSet = new Map();
  for (const m of modules) {
    const { a: _a, b: _b, r: _r, ...skeleton } = m;
    set.set(m.modulePath, { ...skeleton, a: seededLoraA(seed, m), b: new Float32Array(m.outFeatures * m.rank) });
  }
  return set;
}
