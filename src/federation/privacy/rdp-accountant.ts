import { FederationError } from '../../errors.js';
import { logErfc } from './log-erfc.js';

/**
 * Rényi-DP accounting of the subsampled Gaussian mechanism (Mironov, Talwar, Zhang 2019,
 * "Rényi Differential Privacy of the Sampled Gaussian Mechanism"), computed the way Opacus's
 * `opacus/accountants/analysis/rdp.py` (itself TF Privacy's rdp_accountant) does, so the ε it
 * reports agrees with theirs: the same orders, the same series for integer and fractional
 * orders, and Balle et al. 2020's RDP → (ε, δ) conversion (Theorem 21 of arXiv:1905.09982).
 */

/** Opacus's RDPAccountant.DEFAULT_ALPHAS: 1.1, 1.2, …, 10.9, then 12, 13, …, 63. */
export const DEFAULT_RDP_ORDERS: readonly number[] = Object.freeze([
  ...Array.from({ length: 99 }, (_, x) => 1 + (x + 1) / 10),
  ...Array.from({ length: 52 }, (_, x) => 12 + x),
]);

/** log(e^x + e^y) without overflow. */
function logAdd(x: number, y: number): number {
  const a = Math.min(x, y);
  const b = Math.max(x, y);
  if (a === -Infinity) return b;
  return Math.log1p(Math.exp(a - b)) + b;
}

/** log(e^x − e^y) for x ≥ y. */
function logSub(x: number, y: number): number {
  if (x < y) throw new FederationError('FED_DP_INVALID', 'RDP series: a log-space difference went negative');
  if (y === -Infinity) return x;
  if (x === y) return -Infinity;
  const d = Math.expm1(x - y);
  return d === Infinity ? x : Math.log(d) + y;
}

/** C(α, i) for real α and integer i ≥ 0: Π_{j<i} (α − j) / (j + 1). */
function binomial(alpha: number, i: number): number {
  let c = 1;
  for (let j = 0; j < i; j++) c = (c * (alpha - j)) / (j + 1);
  return c;
}

/**
 * log A_α for integer α (Section 3.3 of arXiv:1908.10530):
 *   A_α = Σ_{i=0}^{α} C(α, i) q^i (1 − q)^{α−i} exp((i² − i) / (2σ²))
 */
function logAIntegerOrder(q: number, sigma: number, alpha: number): number {
  let logA = -Infinity;
  for (let i = 0; i <= alpha; i++) {
    const logCoef = Math.log(binomial(alpha, i)) + i * Math.log(q) + (alpha - i) * Math.log(1 - q);
    logA = logAdd(logA, logCoef + (i * i - i) / (2 * sigma ** 2));
  }
  return logA;
}

/**
 * log A_α for fractional α: the two integrals over (−∞, z₀] and [z₀, ∞), z₀ = σ² log(1/q − 1) + ½,
 * as series in i until both terms fall below e^−30 (the stopping rule of Opacus / TF Privacy).
 */
function logAFractionalOrder(q: number, sigma: number, alpha: number): number {
  let logA0 = -Infinity;
  let logA1 = -Infinity;
  const z0 = sigma ** 2 * Math.log(1 / q - 1) + 0.5;
  for (let i = 0; ; i++) {
    const coef = binomial(alpha, i);
    const logCoef = Math.log(Math.abs(coef));
    const j = alpha - i;
    const logT0 = logCoef + i * Math.log(q) + j * Math.log(1 - q);
    const logT1 = logCoef + j * Math.log(q) + i * Math.log(1 - q);
    const logE0 = Math.log(0.5) + logErfc((i - z0) / (Math.SQRT2 * sigma));
    const logE1 = Math.log(0.5) + logErfc((z0 - j) / (Math.SQRT2 * sigma));
    const logS0 = logT0 + (i * i - i) / (2 * sigma ** 2) + logE0;
    const logS1 = logT1 + (j * j - j) / (2 * sigma ** 2) + logE1;
    if (coef > 0) {
      logA0 = logAdd(logA0, logS0);
      logA1 = logAdd(logA1, logS1);
    } else {
      logA0 = logSub(logA0, logS0);
      logA1 = logSub(logA1, logS1);
    }
    if (Math.max(logS0, logS1) < -30) break;
  }
  return logAdd(logA0, logA1);
}

/** RDP of one step of the sampled Gaussian mechanism at order α (may be Infinity). */
function rdpOneStep(q: number, sigma: number, alpha: number): number {
  if (q === 0) return 0;
  if (sigma === 0) return Infinity;
  if (q === 1) return alpha / (2 * sigma ** 2);
  if (alpha === Infinity) return Infinity;
  const logA = Number.isInteger(alpha) ? logAIntegerOrder(q, sigma, alpha) : logAFractionalOrder(q, sigma, alpha);
  return logA / (alpha - 1);
}

function checkMechanism(q: number, sigma: number, steps: number): void {
  if (!(q >= 0 && q <= 1)) throw new FederationError('FED_DP_INVALID', `sample rate ${q} is not in [0, 1]`);
  if (!(sigma >= 0) || !Number.isFinite(sigma)) throw new FederationError('FED_DP_INVALID', `noise multiplier ${sigma} is not a finite number ≥ 0`);
  if (!Number.isSafeInteger(steps) || steps < 0) throw new FederationError('FED_DP_INVALID', `steps ${steps} is not a non-negative integer`);
}

/** RDP at each order of `steps` compositions of the sampled Gaussian mechanism (q, σ). */
export function computeRdp(q: number, noiseMultiplier: number, steps: number, orders: readonly number[] = DEFAULT_RDP_ORDERS): number[] {
  checkMechanism(q, noiseMultiplier, steps);
  return orders.map((alpha) => {
    if (!(alpha > 1)) throw new FederationError('FED_DP_INVALID', `RDP order ${alpha} must be greater than 1`);
    const r = rdpOneStep(q, noiseMultiplier, alpha);
    return steps === 0 ? 0 : r * steps;
  });
}

export interface PrivacySpent {
  epsilon: number;
  /** The order at which ε is smallest (NaN when there is no privacy at all). */
  order: number;
}

/**
 * (ε, δ) from RDP values (Balle et al. 2020, Theorem 21):
 *   ε = min_α [ RDP(α) − (log δ + log α) / (α − 1) + log((α − 1) / α) ]
 */
export function privacySpent(orders: readonly number[], rdp: readonly number[], delta: number): PrivacySpent {
  if (orders.length !== rdp.length) throw new FederationError('FED_DP_INVALID', 'orders and RDP values differ in length');
  if (!(delta > 0 && delta < 1)) throw new FederationError('FED_DP_INVALID', `delta ${delta} is not in (0, 1)`);
  let best = { epsilon: NaN, order: NaN };
  orders.forEach((a, i) => {
    const eps = rdp[i] - (Math.log(delta) + Math.log(a)) / (a - 1) + Math.log((a - 1) / a);
    if (!Number.isNaN(eps) && !(eps >= best.epsilon)) best = { epsilon: eps, order: a };
  });
  return Number.isNaN(best.epsilon) ? { epsilon: Infinity, order: NaN } : best;
}

/** One homogeneous stretch of a job's mechanism: `steps` steps at sample rate q and multiplier σ. */
export interface MechanismSteps {
  noiseMultiplier: number;
  sampleRate: number;
  steps: number;
}

/** ε after composing every stretch (RDP adds across steps and stretches). */
export function epsilonOf(history: readonly MechanismSteps[], delta: number, orders: readonly number[] = DEFAULT_RDP_ORDERS): PrivacySpent {
  const total = new Array<number>(orders.length).fill(0);
  for (const h of history) {
    computeRdp(h.sampleRate, h.noiseMultiplier, h.steps, orders).forEach((r, i) => (total[i] += r));
  }
  return privacySpent(orders, total, delta);
}

/** Appends `steps` steps (one by default) to a history, merging them into the last stretch when (σ, q) are the same (as Opacus does). */
export function addStep(history: MechanismSteps[], noiseMultiplier: number, sampleRate: number, steps = 1): MechanismSteps[] {
  const last = history[history.length - 1];
  if (last && last.noiseMultiplier === noiseMultiplier && last.sampleRate === sampleRate) {
    return [...history.slice(0, -1), { ...last, steps: last.steps + steps }];
  }
  return [...history, { noiseMultiplier, sampleRate, steps }];
}

/**
 * The smallest σ (within Opacus's search) whose ε after `steps` steps at rate q is below the
 * target: Opacus's get_noise_multiplier, bit for bit in its search (doubling from 10, then
 * bisection until ε is within `tolerance` below the target), so results agree with it.
 */
export function noiseMultiplierFor(targetEpsilon: number, delta: number, sampleRate: number, steps: number, tolerance = 0.01, orders: readonly number[] = DEFAULT_RDP_ORDERS): number {
  if (!(targetEpsilon > 0) || !Number.isFinite(targetEpsilon)) throw new FederationError('FED_DP_INVALID', `target epsilon ${targetEpsilon} is not a positive number`);
  checkMechanism(sampleRate, 1, steps);
  const eps = (sigma: number) => epsilonOf([{ noiseMultiplier: sigma, sampleRate, steps }], delta, orders).epsilon;
  let low = 0;
  let high = 10;
  let epsHigh = Infinity;
  while (epsHigh > targetEpsilon) {
    high *= 2;
    epsHigh = eps(high);
    if (high > 1e6) throw new FederationError('FED_DP_BUDGET_EXCEEDED', `no noise multiplier up to 1e6 reaches epsilon ${targetEpsilon} (the privacy budget is too low)`);
  }
  while (targetEpsilon - epsHigh > tolerance) {
    const sigma = (low + high) / 2;
    const e = eps(sigma);
    if (e < targetEpsilon) {
      high = sigma;
      epsHigh = e;
    } else {
      low = sigma;
    }
  }
  return high;
}
