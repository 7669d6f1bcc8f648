import { FederationError } from '../../errors.js';

/**
 * The robust rules' arithmetic on plain vectors, shared by every method (the callers decide what
 * a vector is: a client's change in its trained factors, or the Gram entries of its ΔW).
 */

/** The factor that brings a vector of L2 norm `norm` within `bound`: min(1, bound / norm). */
export function boundFactor(norm: number, bound: number): number {
  return norm > bound ? bound / norm : 1;
}

/**
 * Coordinate-wise trimmed mean (Yin et al. 2018): at every coordinate the ⌊β·K⌋ smallest and
 * ⌊β·K⌋ largest of the K clients' values are dropped and the rest averaged (unweighted, as
 * Flower's FedTrimmedAvg does).
 */
export function trimmedMean(parts: readonly Float64Array[], beta: number): Float64Array {
  const K = parts.length;
  const cut = Math.floor(beta * K);
  if (K - 2 * cut < 1) throw new FederationError('FED_ROBUST_UNSUPPORTED', `trimmed mean with beta ${beta} leaves nothing of ${K} updates`);
  const out = new Float64Array(parts[0].length);
  const col = new Float64Array(K);
  for (let i = 0; i < out.length; i++) {
    for (let k = 0; k < K; k++) col[k] = parts[k][i];
    col.sort();
    let s = 0;
    for (let k = cut; k < K - cut; k++) s += col[k];
    out[i] = s / (K - 2 * cut);
  }
  return out;
}

/** Coordinate-wise median (the mean of the two middle values when K is even, as numpy's). */
export function coordinateMedian(parts: readonly Float64Array[]): Float64Array {
  const K = parts.length;
  const out = new Float64Array(parts[0].length);
  const col = new Float64Array(K);
  for (let i = 0; i < out.length; i++) {
    for (let k = 0; k < K; k++) col[k] = parts[k][i];
    col.sort();
    out[i] = K % 2 === 1 ? col[(K - 1) / 2] : (col[K / 2 - 1] + col[K / 2]) / 2;
  }
  return out;
}

/**
 * Krum and multi-Krum (Blanchard et al. 2017): each update's score is the sum of its squared
 * distances to its K − f − 2 nearest other updates; the m lowest scores are selected (m = 1 is
 * Krum). `d2` is the K×K matrix of squared distances. Ties go to the lower index.
 */
export function krumSelect(d2: readonly (readonly number[])[], f: number, m: number): { selected: number[]; scores: number[] } {
  const K = d2.length;
  const neighbours = K - f - 2;
  if (neighbours < 1) throw new FederationError('FED_ROBUST_UNSUPPORTED', `krum with f = ${f} needs at least ${f + 3} updates, got ${K}`);
  if (m < 1 || m > K) throw new FederationError('FED_ROBUST_UNSUPPORTED', `krum keeps m = ${m} of ${K} updates`);
  const scores = d2.map((row, i) => {
    const others = row.filter((_, j) => j !== i).sort((x, y) => x - y);
    return others.slice(0, neighbours).reduce((s, x) => s + x, 0);
  });
  const order = scores.map((s, i) => [s, i] as const).sort((x, y) => x[0] - y[0] || x[1] - y[1]);
  return { selected: order.slice(0, m).map(([, i]) => i).sort((x, y) => x - y), scores };
}

/** Squared distances ‖x_i − x_j‖² from a Gram matrix G_ij = ⟨x_i, x_j⟩ (clamped at 0 against rounding). */
export function distancesFromGram(gram: readonly (readonly number[])[]): number[][] {
  return gram.map((row, i) => row.map((g, j) => (i === j ? 0 : Math.max(0, gram[i][i] + gram[j][j] - 2 * g))));
}
