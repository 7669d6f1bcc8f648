import type { FactorSet } from '../lora-factors.js';
import { lowRankGram, matrix, normFromGram } from '../low-rank.js';
import { checkModuleSets, clientModule, exampleWeights, skeleton, weightedSum, type ClientUpdate } from './client-update.js';

export interface FedavgResult {
  /** Ā, B̄ per module, same ranks as the clients' */
  global: FactorSet;
  /**
   * ‖Σ_k p_k B_k A_k − B̄Ā‖_F / ‖Σ_k p_k B_k A_k‖_F over all modules together (square roots of
   * summed squares): how far the served adapter is from the average of the clients' ΔW.
   * The LoRA scale s is the same for every client, so it cancels. 0 when Σ p_k B_k A_k = 0.
   */
  relativeError: number;
}

/**
 * FedIT (FedAvg on LoRA factors): average A and B separately,
 *   Ā = Σ_k p_k A_k,  B̄ = Σ_k p_k B_k,   p_k = n_k / Σ n
 * which is inexact: B̄·Ā ≠ Σ_k p_k B_k A_k in general (the cross terms p_j p_k B_j A_k remain).
 * `global`, when given, fixes the module set and ranks the clients must match (the state
 * they started from); otherwise the first update's modules do.
 */
export function aggregateFedavg(global: FactorSet | undefined, updates: readonly ClientUpdate[]): FedavgResult {
  const p = exampleWeights(updates);
  const modules = global && global.size > 0 ? global : updates[0].factors;
  checkModuleSets(updates, modules);
  const out: FactorSet = new Map();
  let errorSq = 0;
  let idealSq = 0;
  for (const like of modules.values()) {
    const parts = updates.map((u) => clientModule(u, like, ['a', 'b'], like.rank));
    const a = weightedSum(parts.map((m) => m.a!), p);
    const b = weightedSum(parts.map((m) => m.b!), p);
    out.set(like.modulePath, { ...skeleton(like), a, b });

    // One Gram matrix of [B_1A_1, …, B_KA_K, B̄Ā] gives both norms:
    //   ‖Σ p_k B_kA_k‖² = pᵀ·G·p,   ‖Σ p_k B_kA_k − B̄Ā‖² = [p, −1]ᵀ·G·[p, −1]
    const { rank, inFeatures, outFeatures } = like;
    const products = [...parts.map((m) => ({ b: m.b!, a: m.a! })), { b, a }].map((f) => ({ b: matrix(outFeatures, rank, f.b), a: matrix(rank, inFeatures, f.a) }));
    const gram = lowRankGram(products);
    idealSq += normFromGram(gram, [...p, 0]) ** 2;
    errorSq += normFromGram(gram, [...p, -1]) ** 2;
  }
  return { global: out, relativeError: idealSq === 0 ? 0 : Math.sqrt(errorSq / idealSq) };
}
