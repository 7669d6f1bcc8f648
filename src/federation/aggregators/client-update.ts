import { FederationError, UpdateRejectedError } from '../../errors.js';
import { factorShape, type FactorSet, type ModuleFactors } from '../lora-factors.js';
import { matrix, type Matrix } from '../low-rank.js';

/** One client's accepted update for a round, as the codec decoded it. */
export interface ClientUpdate {
  client: string;
  /** n_k: the training examples the client used this round (its weight is n_k / Σ n) */
  numExamples: number;
  /** what the client trained: fedavg/flora a + b, ffa b, fedsb r */
  factors: FactorSet;
}

/** Which factor of a module: a = lora_A [rank,in], b = lora_B [out,rank], r = lora_R [rank,rank]. */
export type FactorKey = 'a' | 'b' | 'r';

const LETTER: Record<FactorKey, 'A' | 'B' | 'R'> = { a: 'A', b: 'B', r: 'R' };

/** p_k = n_k / Σ_j n_j, the clients' shares of the round's training examples. */
export function exampleWeights(updates: readonly ClientUpdate[]): number[] {
  if (updates.length === 0) throw new FederationError('FED_QUORUM_NOT_MET', 'no client updates to aggregate');
  for (const u of updates) {
    if (!Number.isSafeInteger(u.numExamples) || u.numExamples <= 0) {
      throw new UpdateRejectedError('num_examples_invalid', `client '${u.client}': numExamples ${u.numExamples} is not a positive integer`);
    }
  }
  const total = updates.reduce((s, u) => s + u.numExamples, 0);
  return updates.map((u) => u.numExamples / total);
}

/** Refuses an update naming a module the aggregate does not have (the codec refuses it first). */
export function checkModuleSets(updates: readonly ClientUpdate[], modules: FactorSet): void {
  for (const u of updates) {
    for (const path of u.factors.keys()) {
      if (!modules.has(path)) throw new UpdateRejectedError('unexpected_tensor', `client '${u.client}' sent factors for ${path}, which this job does not adapt`);
    }
  }
}

/**
 * The client's module matching `like` (same path, in and out features), with factor `which`
 * present and of its stated shape. `rank` pins the rank when the method fixes it.
 */
export function clientModule(update: ClientUpdate, like: ModuleFactors, which: FactorKey[], rank?: number): ModuleFactors {
  const m = update.factors.get(like.modulePath);
  if (!m) throw new UpdateRejectedError('missing_tensor', `client '${update.client}' sent nothing for ${like.modulePath}`);
  if (m.inFeatures !== like.inFeatures || m.outFeatures !== like.outFeatures || (rank !== undefined && m.rank !== rank)) {
    throw new UpdateRejectedError(
      'shape_mismatch',
      `client '${update.client}': ${like.modulePath} is ${m.inFeatures}→${m.outFeatures} rank ${m.rank}, expected ${like.inFeatures}→${like.outFeatures}${rank === undefined ? '' : ` rank ${rank}`}`,
    );
  }
  for (const w of which) requireFactor(m, w, `client '${update.client}'`);
  return m;
}

/** Checks that factor `which` is present with the length its shape needs. */
export function requireFactor(m: ModuleFactors, which: FactorKey, owner: string): Float32Array {
  const data = m[which];
  const [rows, cols] = factorShape(m, LETTER[which]);
  if (!data) throw new UpdateRejectedError('missing_tensor', `${owner}: lora_${LETTER[which]} of ${m.modulePath} is missing`);
  if (data.length !== rows * cols) {
    throw new UpdateRejectedError('shape_mismatch', `${owner}: lora_${LETTER[which]} of ${m.modulePath} holds ${data.length} values, not [${rows}, ${cols}]`);
  }
  return data;
}

/** A module's factor as a float64 matrix of its stored shape. */
export function factorMatrix(m: ModuleFactors, which: FactorKey): Matrix {
  const [rows, cols] = factorShape(m, LETTER[which]);
  return matrix(rows, cols, requireFactor(m, which, 'global'));
}

/** Σ_k p_k·X_k, accumulated in float64 and stored as float32. */
export function weightedSum(parts: readonly Float32Array[], weights: readonly number[]): Float32Array {
  const acc = new Float64Array(parts[0].length);
  parts.forEach((x, k) => {
    const p = weights[k];
    for (let i = 0; i < acc.length; i++) acc[i] += p * x[i];
  });
  return Float32Array.from(acc);
}

/** A module's shape fields without any factor. */
export function skeleton(m: ModuleFactors, rank = m.rank): ModuleFactors {
  return { modulePath: m.modulePath, layer: m.layer, proj: m.proj, inFeatures: m.inFeatures, outFeatures: m.outFeatures, rank };
}
