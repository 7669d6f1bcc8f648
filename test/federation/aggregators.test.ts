import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { FederationError } from '../../src/errors.js';
import { aggregateFedavg } from '../../src/federation/aggregators/fedavg.js';
import { aggregateFedsb } from '../../src/federation/aggregators/fedsb.js';
import { fedsbRandomInit } from '../../src/federation/aggregators/fedsb-init.js';
import { aggregateFfa } from '../../src/federation/aggregators/ffa.js';
import { aggregateFlora, type FloraClientUpdate } from '../../src/federation/aggregators/flora.js';
import { exampleWeights, type ClientUpdate } from '../../src/federation/aggregators/client-update.js';
import type { FactorSet } from '../../src/federation/lora-factors.js';
import { seededLoraA } from '../../src/federation/lora-init.js';
import { add, denseOf, frob, mul, singularValuesReference } from './dense-reference.js';
import { deltas, denseSum, gqaModules, randomFactors, relErrAll, shares } from './factor-fixtures.js';
import { rejects } from '../helpers/error-matchers.js';

const NS = [10, 30, 60];
const modules = gqaModules(4);


describe('client weights', () => {
  it('p_k = n_k / Σ n', () => {
    const p = exampleWeights(NS.map((n, k) => ({ client: `c${k}`, numExamples: n, factors: new Map() })));
    assert.deepEqual(p, [0.1, 0.3, 0.6]);
  });

  it('refuses no updates (FED_QUORUM_NOT_MET) and a count that is not a positive integer (num_examples_invalid)', () => {
    assert.throws(() => exampleWeights([]), (e: unknown) => e instanceof FederationError && e.code === 'FED_QUORUM_NOT_MET');
    for (const n of [0, -3, 2.5, NaN]) {
      assert.throws(() => exampleWeights([{ client: 'c0', numExamples: n, factors: new Map() }]), rejects('num_examples_invalid', 'c0'));
    }
  });
});

describe('fedavg (FedIT): A and B averaged separately', () => {
  const updates: ClientUpdate[] = NS.map((n, k) => ({ client: `c${k}`, numExamples: n, factors: randomFactors(100 + k, modules, ['a', 'b']) }));

  it('Ā = Σ p_k A_k and B̄ = Σ p_k B_k, and relativeError > 0 equals the dense ‖Σ p_k B_k A_k − B̄Ā‖ / ‖Σ p_k B_k A_k‖ over all modules', () => {
    const { global, relativeError } = aggregateFedavg(undefined, updates);
    const p = shares(NS);
    for (const m of modules) {
      const g = global.get(m.modulePath)!;
      assert.equal(g.rank, 4);
      for (const key of ['a', 'b'] as const) {
        const want = g[key]!.map((_, i) => updates.reduce((s, u, k) => s + p[k] * u.factors.get(m.modulePath)![key]![i], 0));
        for (let i = 0; i < want.length; i++) assert.ok(Math.abs(g[key]![i] - want[i]) < 1e-6);
      }
    }
    const ideal = denseSum(updates.map((u, k) => ({ coef: p[k], delta: deltas(u.factors) })), modules);
    const denseError = relErrAll(deltas(global), ideal);
    assert.ok(relativeError > 0.05, `FedIT is inexact on random factors: ${relativeError}`);
    assert.ok(Math.abs(relativeError - denseError) < 1e-5 * denseError, `${relativeError} vs dense ${denseError}`);
  });

  it('relativeError is 0 when every client sent the same factors, and the global module set follows `global` when given', () => {
    const same = randomFactors(7, modules, ['a', 'b']);
    const { relativeError } = aggregateFedavg(undefined, NS.map((n, k) => ({ client: `c${k}`, numExamples: n, factors: same })));
    assert.ok(relativeError < 1e-6, String(relativeError));
    const start = randomFactors(8, modules, ['a', 'b']);
    assert.deepEqual([...aggregateFedavg(start, updates).global.keys()], modules.map((m) => m.modulePath));
  });

  it('rejects a client missing a module, naming a module the job lacks, or of another rank', () => {
    const missing = new Map(updates[0].factors);
    missing.delete(modules[1].modulePath);
    assert.throws(() => aggregateFedavg(undefined, [updates[1], { ...updates[0], factors: missing }]), rejects('missing_tensor', 'c0', modules[1].modulePath));
    const extra = new Map(updates[0].factors);
    extra.set('model.layers.5.self_attn.q_proj', { ...modules[0], modulePath: 'model.layers.5.self_attn.q_proj', layer: 5 });
    assert.throws(() => aggregateFedavg(undefined, [updates[1], { ...updates[0], factors: extra }]), rejects('unexpected_tensor', 'model.layers.5'));
    const rank8 = randomFactors(9, modules, ['a', 'b'], 8);
    assert.throws(() => aggregateFedavg(undefined, [updates[1], { ...updates[0], factors: rank8 }]), rejects('shape_mismatch', 'rank 8'));
  });
});

describe('ffa (FFA-LoRA): A frozen from the seed, B averaged', () => {
  it('s·B̄·A equals Σ p_k s·B_k·A exactly (1e-5 relative, dense float64)', () => {
    const fixedA: FactorSet = new Map(modules.map((m) => [m.modulePath, { ...m, a: seededLoraA(42, m) }]));
    const updates = NS.map((n, k) => ({ client: `c${k}`, numExamples: n, factors: randomFactors(200 + k, modules, ['b']) }));
    const { global } = aggregateFfa(fixedA, updates);
    const s = 16 / 4;
    const p = shares(NS);
    const withA = (f: FactorSet): FactorSet => new Map([...f].map(([k, m]) => [k, { ...m, a: fixedA.get(k)!.a }]));
    const ideal = denseSum(updates.map((u, k) => ({ coef: p[k], delta: deltas(withA(u.factors), s) })), modules);
    const err = relErrAll(deltas(global, s), ideal);
    assert.ok(err < 1e-5, `relative error ${err}`);
    for (const m of modules) assert.equal(global.get(m.modulePath)!.a, fixedA.get(m.modulePath)!.a);
  });
});

describe('flora (FLoRA stacking): clients of ranks 4, 8 and 16', () => {
  const RANKS = [4, 8, 16];
  const ALPHA = 16;
  const clientUpdates = (seed: number): FloraClientUpdate[] =>
    RANKS.map((r, k) => ({ client: `c${k}`, numExamples: NS[k], scale: ALPHA / r, factors: randomFactors(seed + k, modules, ['a', 'b'], r) }));
  const idealOf = (updates: FloraClientUpdate[], previous?: FactorSet) => {
    const p = shares(NS);
    const terms = updates.map((u, k) => ({ coef: p[k] * u.scale, delta: deltas(u.factors) }));
    if (previous) terms.push({ coef: 1, delta: deltas(previous) });
    return denseSum(terms, modules);
  };

  it('without a previous global: B·A = Σ p_k s_k B_k A_k exactly, at stacked rank 28, served at scale 1', () => {
    const updates = clientUpdates(300);
    const res = aggregateFlora(undefined, updates, 64);
    assert.deepEqual([res.rank, res.keptFraction, res.compressed], [28, 1, false]);
    for (const m of res.global.values()) assert.equal(m.rank, 28);
    const err = relErrAll(deltas(res.global), idealOf(updates));
    assert.ok(err < 1e-5, `relative error ${err}`);
  });

  it('on a previous global of rank 6: B·A = B_prev·A_prev + Σ p_k s_k B_k A_k exactly, at rank 34', () => {
    const previous = randomFactors(400, modules, ['a', 'b'], 6);
    const updates = clientUpdates(310);
    const res = aggregateFlora(previous, updates, 64);
    assert.deepEqual([res.rank, res.keptFraction, res.compressed], [34, 1, false]);
    const err = relErrAll(deltas(res.global), idealOf(updates, previous));
    assert.ok(err < 1e-5, `relative error ${err}`);
  });

  it('past maxRank: each module is the dense best rank-maxRank approximation and keptFraction is Σ kept σ² / Σ σ² of the dense ΔW over all modules', () => {
    const previous = randomFactors(410, modules, ['a', 'b'], 6);
    const updates = clientUpdates(320);
    const maxRank = 10;
    const res = aggregateFlora(previous, updates, maxRank);
    assert.equal(res.compressed, true);
    assert.equal(res.rank, maxRank);
    const ideal = idealOf(updates, previous);
    let total = 0;
    let kept = 0;
    for (const m of modules) {
      const w = ideal.get(m.modulePath)!;
      const sig2 = singularValuesReference(w).map((s) => s * s);
      const k = Math.min(maxRank, sig2.length);
      const keptHere = sig2.slice(0, k).reduce((a, b) => a + b, 0);
      const totalHere = sig2.reduce((a, b) => a + b, 0);
      total += totalHere;
      kept += keptHere;
      // Eckart–Young: ‖W − W_k‖² = Σ_{i>k} σ_i², the least any rank-k matrix can leave
      const g = res.global.get(m.modulePath)!;
      assert.equal(g.rank, k);
      const resid = frob(add(w, mul(denseOf(m.outFeatures, g.rank, g.b!), denseOf(g.rank, m.inFeatures, g.a!)), -1));
      assert.ok(Math.abs(resid ** 2 - (totalHere - keptHere)) < 1e-4 * totalHere, `${m.modulePath}: residual² ${resid ** 2} vs ${totalHere - keptHere}`);
    }
    assert.ok(res.keptFraction < 1 && Math.abs(res.keptFraction - kept / total) < 1e-6, `keptFraction ${res.keptFraction} vs dense ${kept / total}`);
  });

  it('compression is triggered by a stack past maxRank only, and loses nothing on a module whose ΔW rank is below maxRank (k_proj 32→16)', () => {
    const updates = clientUpdates(330);
    assert.equal(aggregateFlora(undefined, updates, 28).compressed, false);
    const res = aggregateFlora(undefined, updates, 27);
    assert.equal(res.compressed, true);
    const k = res.global.get('model.layers.0.self_attn.k_proj')!;
    const w = idealOf(updates).get(k.modulePath)!;
    const back = mul(denseOf(k.outFeatures, k.rank, k.b!), denseOf(k.rank, k.inFeatures, k.a!));
    assert.ok(frob(add(back, w, -1)) < 1e-5 * frob(w));
    assert.ok(k.rank <= 16, `k_proj rank ${k.rank} is at most min(in, out) = 16`);
  });
});

describe('fedsb (Fed-SB): R averaged between frozen B and A', () => {
  it('B·R̄·A equals Σ p_k B·R_k·A exactly (1e-5 relative, dense float64)', () => {
    const start = fedsbRandomInit(5, modules, 4);
    const updates = NS.map((n, k) => ({ client: `c${k}`, numExamples: n, factors: randomFactors(500 + k, modules, ['r']) }));
    const { global } = aggregateFedsb(start, updates);
    const p = shares(NS);
    const withBA = (f: FactorSet): FactorSet => new Map([...f].map(([k, m]) => [k, { ...m, a: start.get(k)!.a, b: start.get(k)!.b }]));
    const ideal = denseSum(updates.map((u, k) => ({ coef: p[k], delta: deltas(withBA(u.factors)) })), modules);
    const err = relErrAll(deltas(global), ideal);
    assert.ok(err < 1e-5, `relative error ${err}`);
    for (const m of modules) {
      assert.equal(global.get(m.modulePath)!.a, start.get(m.modulePath)!.a);
      assert.equal(global.get(m.modulePath)!.b, start.get(m.modulePath)!.b);
    }
  });

  it('rejects an R of the wrong rank', () => {
    const start = fedsbRandomInit(5, modules, 4);
    assert.throws(() => aggregateFedsb(start, [{ client: 'c9', numExamples: 1, factors: randomFactors(1, modules, ['r'], 3) }]), rejects('shape_mismatch', 'c9'));
  });
});
