import type { FactorSet } from '../lora-factors.js';
import { checkModuleSets, clientModule, exampleWeights, requireFactor, skeleton, weightedSum, type ClientUpdate } from './client-update.js';

/**
 * Fed-SB: B and A are fixed for the whole job (set once by `fedsbGradientInit` or
 * `fedsbRandomInit`); clients train only the r×r matrix R and upload it. ΔW = B·R·A is
 * linear in R, so averaging R is exact:
 *   R̄ = Σ_k p_k R_k   ⇒   B·R̄·A = Σ_k p_k·(B·R_k·A)
 * The result is the global with R replaced by R̄.
 */
export function aggregateFedsb(global: FactorSet, updates: readonly ClientUpdate[]): { global: FactorSet } {
  const p = exampleWeights(updates);
  checkModuleSets(updates, global);
  const out: FactorSet = new Map();
  for (const like of global.values()) {
    const a = requireFactor(like, 'a', 'global');
    const b = requireFactor(like, 'b', 'global');
    const parts = updates.map((u) => clientModule(u, like, ['r'], like.rank));
    out.set(like.modulePath, { ...skeleton(like), a, b, r: weightedSum(parts.map((m) => m.r!), p) });
  }
  return { global: out };
}
