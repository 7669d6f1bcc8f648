import { FederationError } from '../../errors.js';
import { seededLoraA } from '../lora-init.js';
import type { FactorSet, FedMethod, ModuleFactors } from '../lora-factors.js';
import { frobeniusOfSum, lowRankGram, matmul, matrix, type Matrix } from '../low-rank.js';
import { checkModuleSets, clientModule, exampleWeights, requireFactor, type ClientUpdate, type FactorKey } from './client-update.js';
import { aggregateFlora } from './flora.js';
import { GaussianNoise } from './gaussian-noise.js';
import { boundFactor, coordinateMedian, distancesFromGram, krumSelect, trimmedMean } from './robust-rules.js';

/**
 * Robust aggregation and client-level differential privacy (DP-FedAvg, McMahan et al. 2018) on
 * top of the four methods. A client's update is its change in what it trained this round:
 *
 *   fedavg  Δ_k = (A_k − Ā, B_k − B̄)    ffa  Δ_k = B_k − B̄    fedsb  Δ_k = R_k − R̄
 *   flora   Δ_k = (A_k − A⁰_k, B_k)      (A⁰_k: the client's fresh seeded A; B starts at 0)
 *
 * Order: the norm bound (robust.norm_bound, S) scales Δ_k to ‖Δ_k‖ ≤ S (for flora the bound is
 * on ‖s_k B_k A_k‖_F, from r×r products); DP clips Δ_k to C the same way (flora: the joint
 * (ΔA, B) vector); then one combine rule:
 *   dp            next = prev + (Σ_k Δ_k) / m + N(0, (σ·C/m)²) per coordinate, m = clients sampled
 *                 (flora: each client's block is released on its own, so N(0, (σ·C)²) on it, p = 1/m)
 *   trimmed_mean  coordinate-wise over the Δ_k (ffa on B, fedsb on R: one basis for all clients)
 *   median        likewise
 *   krum (f, m)   the m updates with the lowest Krum scores on ΔW distances, example-weighted
 *   (none)        Σ p_k Δ_k, i.e. the method's own weighted average
 */

export interface RobustRule {
  normBound?: number;
  rule?: 'trimmed_mean' | 'median' | 'krum';
  beta?: number;
  f?: number;
  m?: number;
}

export interface ClientDpRule {
  clipNorm: number;
  noiseMultiplier: number;
  /** m: the clients sampled for the round (the fixed denominator, reported or not). */
  denominator: number;
  /** 32-byte secret of the job; with `label` it fixes the noise (same on a re-run). */
  noiseKey: Uint8Array;
  label: string;
  /** flora: each client's training seed this round (its fresh A⁰ is seededLoraA(seed, ·)). */
  floraSeeds?: Record<string, number>;
}

export interface RuleStats {
  /** ‖Δ_k‖ before any bound (flora with only a norm bound: ‖s_k B_k A_k‖_F). */
  norms: Record<string, number>;
  bounded: string[];
  clipped: string[];
  selected?: string[];
  noiseStd?: number;
}

type Update = ClientUpdate & { scale: number };

const TRAINED: Record<Exclude<FedMethod, 'flora'>, FactorKey[]> = { fedavg: ['a', 'b'], ffa: ['b'], fedsb: ['r'] };

function f64(x: Float32Array): Float64Array {
  return Float64Array.from(x);
}

function l2(parts: readonly Float64Array[]): number {
  let s = 0;
  for (const p of parts) for (let i = 0; i < p.length; i++) s += p[i] * p[i];
  return Math.sqrt(s);
}

function scaleInPlace(parts: Float64Array[], c: number): void {
  if (c === 1) return;
  for (const p of parts) for (let i = 0; i < p.length; i++) p[i] *= c;
}

/** Σ_k w_k x_k. */
function combine(parts: readonly Float64Array[], w: readonly number[]): Float64Array {
  const out = new Float64Array(parts[0].length);
  parts.forEach((x, k) => {
    for (let i = 0; i < out.length; i++) out[i] += w[k] * x[i];
  });
  return out;
}

function refuseCoordinateRule(method: FedMethod, rule: string): never {
  throw new FederationError('FED_ROBUST_UNSUPPORTED', `${rule} is coordinate-wise, which needs every client's factor in one basis (ffa's B, fedsb's R); ${method}'s factors are not comparable coordinate by coordinate`);
}

/** fedavg, ffa, fedsb under the rules: the next global state. */
export function ruledAverage(method: Exclude<FedMethod, 'flora'>, previous: FactorSet, updates: readonly Update[], robust: RobustRule | undefined, dp: ClientDpRule | undefined): { next: FactorSet; stats: RuleStats } {
  const p = exampleWeights(updates);
  checkModuleSets(updates, previous);
  const keys = TRAINED[method];
  const modules = [...previous.values()];
  // slot s = (module, key); Δ_k[s] = client − previous
  const slots = modules.flatMap((like) => keys.map((key) => ({ like, key, prev: requireFactor(like, key, 'global') })));
  const deltas = updates.map((u) => {
    const mods = new Map(modules.map((like) => [like.modulePath, clientModule(u, like, keys, like.rank)]));
    return slots.map(({ like, key, prev }) => {
      const x = mods.get(like.modulePath)![key]!;
      const d = new Float64Array(x.length);
      for (let i = 0; i < d.length; i++) d[i] = x[i] - prev[i];
      return d;
    });
  });
  const stats: RuleStats = { norms: {}, bounded: [], clipped: [] };
  deltas.forEach((d, k) => {
    const n = l2(d);
    stats.norms[updates[k].client] = n;
    if (robust?.normBound !== undefined && n > robust.normBound) {
      scaleInPlace(d, boundFactor(n, robust.normBound));
      stats.bounded.push(updates[k].client);
    }
    if (dp) {
      const n2 = l2(d);
      if (n2 > dp.clipNorm) {
        scaleInPlace(d, boundFactor(n2, dp.clipNorm));
        stats.clipped.push(updates[k].client);
      }
    }
  });

  let sum: Float64Array[];
  if (dp) {
    // fixed denominator: a client that did not report counts as a zero update
    const w = updates.map(() => 1 / dp.denominator);
    sum = slots.map((_, s) => combine(deltas.map((d) => d[s]), w));
    const std = (dp.noiseMultiplier * dp.clipNorm) / dp.denominator;
    const noise = new GaussianNoise(dp.noiseKey, dp.label);
    for (const x of sum) noise.addTo(x, std);
    stats.noiseStd = std;
  } else if (robust?.rule === 'trimmed_mean' || robust?.rule === 'median') {
    if (method === 'fedavg') refuseCoordinateRule(method, robust.rule);
    sum = slots.map((_, s) => (robust.rule === 'median' ? coordinateMedian(deltas.map((d) => d[s])) : trimmedMean(deltas.map((d) => d[s]), robust.beta ?? 0.1)));
  } else if (robust?.rule === 'krum') {
    const d2 = averagingDistances(method, modules, slots, deltas, updates[0].scale);
    const { selected } = krumSelect(d2, robust.f ?? 1, robust.m ?? 1);
    stats.selected = selected.map((k) => updates[k].client);
    const total = selected.reduce((s, k) => s + p[k], 0);
    const w = p.map((pk, k) => (selected.includes(k) ? pk / total : 0));
    sum = slots.map((_, s) => combine(deltas.map((d) => d[s]), w));
  } else {
    sum = slots.map((_, s) => combine(deltas.map((d) => d[s]), p));
  }

  const next: FactorSet = new Map(modules.map((m) => [m.modulePath, { ...m }]));
  slots.forEach(({ like, key, prev }, s) => {
    const out = new Float32Array(prev.length);
    for (let i = 0; i < out.length; i++) out[i] = prev[i] + sum[s][i];
    next.get(like.modulePath)![key] = out;
  });
  return { next, stats };
}

/**
 * Squared ΔW distances between the clients (summed over modules), from factors only:
 *   fedavg ΔW_k = s(B_k A_k − B̄Ā): terms (B_k, A_k) (the previous product cancels in differences)
 *   ffa    ΔW_k = s·ΔB_k·A          fedsb  ΔW_k = s·B·ΔR_k·A
 */
function averagingDistances(method: Exclude<FedMethod, 'flora'>, modules: ModuleFactors[], slots: { like: ModuleFactors; key: FactorKey; prev: Float32Array }[], deltas: Float64Array[][], s: number): number[][] {
  const K = deltas.length;
  const d2 = Array.from({ length: K }, () => new Array<number>(K).fill(0));
  for (const like of modules) {
    const { rank: r, inFeatures: inF, outFeatures: outF } = like;
    const at = (key: FactorKey) => slots.findIndex((x) => x.like === like && x.key === key);
    const terms = deltas.map((d) => {
      if (method === 'fedavg') {
        const a = slots[at('a')].prev;
        const b = slots[at('b')].prev;
        const da = d[at('a')];
        const db = d[at('b')];
        return { b: matrix(outF, r, db.map((x, i) => x + b[i])), a: matrix(r, inF, da.map((x, i) => x + a[i])) };
      }
      if (method === 'ffa') return { b: matrix(outF, r, d[at('b')]), a: matrix(r, inF, requireFactor(like, 'a', 'global')) };
      return { b: matmul(matrix(outF, r, requireFactor(like, 'b', 'global')), matrix(r, r, d[at('r')])), a: matrix(r, inF, requireFactor(like, 'a', 'global')) };
    });
    addGramDistances(d2, terms, s);
  }
  return d2;
}

function addGramDistances(d2: number[][], terms: { b: Matrix; a: Matrix }[], s: number): void {
  const g = lowRankGram(terms);
  const K = terms.length;
  const rows = Array.from({ length: K }, (_, i) => Array.from(g.data.subarray(i * K, (i + 1) * K)));
  const d = distancesFromGram(rows);
  for (let i = 0; i < K; i++) for (let j = 0; j < K; j++) d2[i][j] += s * s * d[i][j];
}

/** flora under the rules: bounded / clipped / noised / selected client blocks, then FLoRA's stacking. */
export function ruledFlora(previous: FactorSet | undefined, updates: readonly Update[], maxRank: number, robust: RobustRule | undefined, dp: ClientDpRule | undefined) {
  if (robust?.rule === 'trimmed_mean' || robust?.rule === 'median') refuseCoordinateRule('flora', robust.rule);
  const modules = previous && previous.size > 0 ? previous : updates[0].factors;
  checkModuleSets(updates, modules);
  const stats: RuleStats = { norms: {}, bounded: [], clipped: [] };
  // every client's modules as float64 (A, B), copies: bounded and noised in place
  let blocks = updates.map((u) => [...modules.values()].map((like) => {
    const m = clientModule(u, like, ['a', 'b']);
    return { like: m, a: f64(m.a!), b: f64(m.b!) };
  }));
  // ‖s_k·B_k·A_k‖_F over all modules, from the r×r Gram products
  const productNorm = (k: number) =>
    Math.sqrt(blocks[k].reduce((s, m) => s + frobeniusOfSum([{ coef: updates[k].scale, b: matrix(m.like.outFeatures, m.like.rank, m.b), a: matrix(m.like.rank, m.like.inFeatures, m.a) }]) ** 2, 0));
  updates.forEach((u, k) => {
    const n = productNorm(k);
    stats.norms[u.client] = n;
    if (robust?.normBound !== undefined && n > robust.normBound) {
      const c = boundFactor(n, robust.normBound);
      for (const m of blocks[k]) scaleInPlace([m.b], c); // ΔW = s·B·A is linear in B
      stats.bounded.push(u.client);
    }
  });
  let kept = updates.map((_, k) => k);
  if (robust?.rule === 'krum') {
    const K = updates.length;
    const d2 = Array.from({ length: K }, () => new Array<number>(K).fill(0));
    blocks[0].forEach((_, mi) => {
      // ΔW_k = s_k·B_k·A_k: the scale folded into A
      const terms = blocks.map((bl, k) => ({ b: matrix(bl[mi].like.outFeatures, bl[mi].like.rank, bl[mi].b), a: matrix(bl[mi].like.rank, bl[mi].like.inFeatures, bl[mi].a.map((x) => x * updates[k].scale)) }));
      addGramDistances(d2, terms, 1);
    });
    kept = krumSelect(d2, robust.f ?? 1, robust.m ?? 1).selected;
    stats.selected = kept.map((k) => updates[k].client);
  }
  let weights: number[] | undefined;
  if (dp) {
    const std = dp.noiseMultiplier * dp.clipNorm;
    const noise = new GaussianNoise(dp.noiseKey, dp.label);
    blocks = blocks.map((bl, k) => {
      const seed = dp.floraSeeds?.[updates[k].client];
      if (seed === undefined) throw new FederationError('FED_DP_INVALID', `no training seed for client '${updates[k].client}': its fresh A cannot be recomputed`);
      const a0 = bl.map((m) => seededLoraA(seed, m.like));
      const da = bl.map((m, i) => m.a.map((x, j) => x - a0[i][j]));
      const parts = [...da, ...bl.map((m) => m.b)];
      const n = l2(parts);
      if (n > dp.clipNorm) {
        scaleInPlace(parts, dp.clipNorm / n);
        stats.clipped.push(updates[k].client);
      }
      for (const x of parts) noise.addTo(x, std);
      return bl.map((m, i) => ({ like: m.like, a: da[i].map((x, j) => x + a0[i][j]), b: m.b }));
    });
    weights = updates.map(() => 1 / dp.denominator);
    stats.noiseStd = std;
  }
  const ruled = kept.map((k) => ({
    ...updates[k],
    factors: new Map(blocks[k].map((m) => [m.like.modulePath, { ...m.like, a: Float32Array.from(m.a), b: Float32Array.from(m.b) }])) as FactorSet,
  }));
  const keptWeights = weights ? kept.map((k) => weights![k]) : undefined;
  return { ...aggregateFlora(previous, ruled, maxRank, keptWeights), stats };
}
