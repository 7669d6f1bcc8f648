import type { FactorSet } from '../lora-factors.js';
import { checkModuleSets, clientModule, exampleWeights, requireFactor, skeleton, weightedSum, type ClientUpdate } from './client-update.js';

/**
 * FFA-LoRA: A is frozen at its random initialisation (every party derives it from the job seed
 * with `seededLoraA` in ../lora-init.ts; clients never change it and upload only B), so averaging B is exact:
 *   B̄ = Σ_k p_k B_k   ⇒   s·B̄·A = Σ_k p_k·(s·B_k·A)
 * The result carries the fixed A and the averaged B.
 */
export function aggregateFfa(fixedA: FactorSet, updates: readonly ClientUpdate[]): { global: FactorSet } {
  const p = exampleWeights(updates);
  checkModuleSets(updates, fixedA);
  const out: FactorSet = new Map();
  for (const like of fixedA.values()) {
    const a = requireFactor(like, 'a', 'fixed A');
    const parts = updates.map((u) => clientModule(u, like, ['b'], like.rank));
    out.set(like.modulePath, { ...skeleton(like), a, b: weightedSum(parts.map((m) => m.b!), p) });
  }
  return { global: out };
}
