import { FederationError } from '../../errors.js';
import type { FactorSet, ModuleFactors } from '../lora-factors.js';
import { frobeniusOfSum, hstack, scale, toFloat32, truncateLowRank, vstack, type Matrix } from '../low-rank.js';
import { checkModuleSets, clientModule, exampleWeights, factorMatrix, skeleton, type ClientUpdate } from './client-update.js';

/** A FLoRA client's update: its own rank (any; 4, 8, 16 …) and its LoRA scale s_k = α/r_k (or α/√r_k). */
export interface FloraClientUpdate extends ClientUpdate {
  scale: number;
}

export interface FloraResult {
  /** stacked (or compressed) factors, scale folded in: served with scale 1 */
  global: FactorSet;
  /**
   * Σ kept σ² / Σ σ² of the stacked ΔW over all modules together (1 when nothing was
   * compressed): the share of the exact aggregate's energy the served adapter keeps.
   */
  keptFraction: number;
  /** the largest module rank after stacking and compression (≤ maxRank) */
  rank: number;
  compressed: boolean;
}

/**
 * FLoRA's stacking aggregation. The global is kept with its scale folded in (served scale 1):
 *   A = [A_prev; p_1 s_1 A_1; …; p_K s_K A_K]   [r_prev + Σ r_k, in]
 *   B = [B_prev, B_1, …, B_K]                   [out, r_prev + Σ r_k]
 * so that, block by block,
 *   B·A = B_prev·A_prev + Σ_k p_k s_k B_k A_k
 * exactly: the p-weighted sum of the clients' ΔW on top of the previous global. Clients'
 * ranks may differ. A module whose stacked rank passes `maxRank` is replaced by its best
 * rank-maxRank approximation (truncateLowRank, from the factors only). `weights` replace the
 * example shares p_k when given.
 */
export function aggregateFlora(previous: FactorSet | undefined, updates: readonly FloraClientUpdate[], maxRank: number, weights?: readonly number[]): FloraResult {
  if (!Number.isSafeInteger(maxRank) || maxRank <= 0) throw new FederationError('FED_JOB_INVALID', `maxRank ${maxRank} is not a positive integer`);
  // p_k: example shares, or the caller's (DP-FedAvg's fixed 1/m)
  const p = weights ?? exampleWeights(updates);
  for (const u of updates) {
    if (!Number.isFinite(u.scale)) throw new FederationError('FED_JOB_INVALID', `client '${u.client}': LoRA scale ${u.scale} is not finite`);
  }
  const modules = previous && previous.size > 0 ? previous : updates[0].factors;
  checkModuleSets(updates, modules);
  const out: FactorSet = new Map();
  let energy = 0;
  let keptEnergy = 0;
  let rank = 0;
  let compressed = false;
  const uncompressed: { b: Matrix; a: Matrix }[] = [];
  for (const like of modules.values()) {
    const hasPrevious = previous !== undefined && previous.size > 0;
    const bs: Matrix[] = hasPrevious ? [factorMatrix(like, 'b')] : [];
    const as: Matrix[] = hasPrevious ? [factorMatrix(like, 'a')] : [];
    updates.forEach((u, k) => {
      const m = clientModule(u, like, ['a', 'b']);
      bs.push(factorMatrix(m, 'b'));
      as.push(scale(factorMatrix(m, 'a'), p[k] * u.scale));
    });
    const b = hstack(bs);
    const a = vstack(as);
    let result: ModuleFactors;
    if (a.rows > maxRank) {
      const t = truncateLowRank(b, a, maxRank);
      compressed = true;
      energy += t.energy;
      keptEnergy += t.energy * t.keptFraction;
      result = { ...skeleton(like, t.rank), a: toFloat32(t.a), b: toFloat32(t.b) };
    } else {
      uncompressed.push({ b, a }); // kept whole: its energy only matters if another module is compressed
      result = { ...skeleton(like, a.rows), a: toFloat32(a), b: toFloat32(b) };
    }
    rank = Math.max(rank, result.rank);
    out.set(like.modulePath, result);
  }
  if (!compressed) return { global: out, keptFraction: 1, rank, compressed };
  for (const t of uncompressed) {
    const e = frobeniusOfSum([{ coef: 1, ...t }]) ** 2;
    energy += e;
    keptEnergy += e;
  }
  return { global: out, keptFraction: energy === 0 ? 1 : keptEnergy / energy, rank, compressed };
}
