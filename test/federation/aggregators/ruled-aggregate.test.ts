import assert from 'node:assert/strict';
import { test } from 'node:test';
import { aggregateFlora } from '../../../src/federation/aggregators/flora.js';
import { GaussianNoise } from '../../../src/federation/aggregators/gaussian-noise.js';
import { ruledAverage, ruledFlora, type ClientDpRule } from '../../../src/federation/aggregators/ruled-aggregate.js';
import { seededLoraA } from '../../../src/federation/lora-init.js';
import type { FactorSet, ModuleFactors } from '../../../src/federation/lora-factors.js';
import { add, frob } from '../dense-reference.js';
import { deltas, gqaModules, randomFactors, shares } from '../factor-fixtures.js';
import { withCode } from '../../helpers/error-matchers.js';

const KEY = new Uint8Array(32).fill(7);
const dp = (o: Partial<ClientDpRule>): ClientDpRule => ({ clipNorm: 1, noiseMultiplier: 0, denominator: 4, noiseKey: KEY, label: 'test/1/1', ...o });

type Key = 'a' | 'b' | 'r';
/** A client whose trained factors are prev + k·(random direction): scale k makes it an outlier. */
function client(id: string, n: number, prev: FactorSet, keys: Key[], seed: number, k = 1) {
  const dir = randomFactors(seed, [...prev.values()], keys, undefined, 0.05);
  const factors: FactorSet = new Map(
    [...prev].map(([path, m]) => {
      const out: ModuleFactors = { ...m, a: undefined, b: undefined, r: undefined };
      for (const w of keys) out[w] = Float32Array.from(m[w]!, (x, i) => x + k * dir.get(path)![w]![i]);
      return [path, out];
    }),
  );
  return { client: id, numExamples: n, factors, scale: 2 };
}

/** Every trained coordinate of a factor set, flattened in module order. */
function flat(set: FactorSet, keys: Key[]): number[] {
  return [...set.values()].flatMap((m) => keys.flatMap((w) => Array.from(m[w]!)));
}

const diff = (x: number[], y: number[]) => x.map((v, i) => v - y[i]);
const norm = (x: number[]) => Math.sqrt(x.reduce((s, v) => s + v * v, 0));

test('dp clipping: with σ = 0 the global moves by Σ_k clip_C(Δ_k) / m, so a client 1000× larger moves it by at most C/m', () => {
  const prev = randomFactors(1, gqaModules(4), ['a', 'b']);
  const ups = [client('c1', 10, prev, ['b'], 2), client('c2', 20, prev, ['b'], 3), client('c3', 5, prev, ['b'], 4), client('big', 10, prev, ['b'], 5, 1000)];
  const C = 0.05;
  const { next, stats } = ruledAverage('ffa', prev, ups, undefined, dp({ clipNorm: C, denominator: 4 }));
  // slow reference: clip each flattened Δ_k, sum, divide by m
  const p0 = flat(prev, ['b']);
  const want = p0.slice();
  for (const u of ups) {
    const d = diff(flat(u.factors, ['b']), p0);
    const c = Math.min(1, C / norm(d));
    d.forEach((v, i) => (want[i] += (c * v) / 4));
  }
  const got = flat(next, ['b']);
  got.forEach((v, i) => assert.ok(Math.abs(v - want[i]) < 1e-6, `coordinate ${i}: ${v} vs ${want[i]}`));
  assert.ok(stats.clipped.includes('big'));
  assert.ok(norm(diff(got, p0)) <= C + 1e-6, 'four clipped updates over m = 4 move the global by at most C');
  // A (frozen for ffa) is untouched
  assert.deepEqual(flat(next, ['a']), flat(prev, ['a']));
});

test('dp noise: every coordinate gets N(0, (σ·C/m)²): mean 0 and std σ·C/m (statistically, fixed key), the same noise for the same round label', () => {
  const prev = randomFactors(6, gqaModules(8, ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj']), ['a', 'b']);
  // clients that did not move: what is left is the noise alone
  const ups = ['c1', 'c2', 'c3'].map((id) => ({ client: id, numExamples: 1, factors: prev, scale: 2 }));
  const rule = dp({ clipNorm: 0.8, noiseMultiplier: 1.3, denominator: 5 });
  const { next, stats } = ruledAverage('ffa', prev, ups, undefined, rule);
  const noise = diff(flat(next, ['b']), flat(prev, ['b']));
  const n = noise.length;
  const mean = noise.reduce((s, v) => s + v, 0) / n;
  const std = Math.sqrt(noise.reduce((s, v) => s + (v - mean) ** 2, 0) / (n - 1));
  const want = (1.3 * 0.8) / 5;
  assert.equal(stats.noiseStd, want);
  assert.ok(n > 3000, `${n} coordinates`);
  assert.ok(Math.abs(std / want - 1) < 0.04, `sample std ${std} vs ${want} over ${n} coordinates`);
  assert.ok(Math.abs(mean) < (4 * want) / Math.sqrt(n), `sample mean ${mean}`);
  // lag-1 correlation of independent draws is about 0
  let c = 0;
  for (let i = 1; i < n; i++) c += (noise[i] - mean) * (noise[i - 1] - mean);
  assert.ok(Math.abs(c / ((n - 1) * std * std)) < 4 / Math.sqrt(n), 'consecutive draws are uncorrelated');
  const again = ruledAverage('ffa', prev, ups, undefined, rule).next;
  assert.deepEqual(flat(again, ['b']), flat(next, ['b']), 'same key and label: same noise (a re-run after a crash publishes the same version)');
  const other = ruledAverage('ffa', prev, ups, undefined, { ...rule, label: 'test/1/2' }).next;
  assert.notDeepEqual(flat(other, ['b']), flat(next, ['b']));
});

test('the noise stream is keyed: another 32-byte key gives unrelated normals', () => {
  const a = new GaussianNoise(KEY, 'x');
  const b = new GaussianNoise(new Uint8Array(32).fill(8), 'x');
  const xa = Array.from({ length: 1000 }, () => a.normal());
  const xb = Array.from({ length: 1000 }, () => b.normal());
  const corr = xa.reduce((s, v, i) => s + v * xb[i], 0) / 1000;
  assert.ok(Math.abs(corr) < 0.15, String(corr));
  assert.throws(() => new GaussianNoise(new Uint8Array(16), 'x'));
});

test('norm_bound: a scale:100 client moves the fedavg aggregate by at most p_k·S (against a slow reference)', () => {
  const prev = randomFactors(7, gqaModules(4), ['a', 'b']);
  const ns = [10, 30, 20, 40];
  const ups = [client('c1', ns[0], prev, ['a', 'b'], 8), client('c2', ns[1], prev, ['a', 'b'], 9), client('c3', ns[2], prev, ['a', 'b'], 10), client('evil', ns[3], prev, ['a', 'b'], 11, 100)];
  const p0 = flat(prev, ['a', 'b']);
  const honestNorms = ups.slice(0, 3).map((u) => norm(diff(flat(u.factors, ['a', 'b']), p0)));
  const S = 1.01 * Math.max(...honestNorms);
  const { next, stats } = ruledAverage('fedavg', prev, ups, { normBound: S }, undefined);
  const p = shares(ns);
  const want = p0.slice();
  ups.forEach((u, k) => {
    const d = diff(flat(u.factors, ['a', 'b']), p0);
    const c = Math.min(1, S / norm(d));
    d.forEach((v, i) => (want[i] += p[k] * c * v));
  });
  flat(next, ['a', 'b']).forEach((v, i) => assert.ok(Math.abs(v - want[i]) < 1e-6));
  assert.deepEqual(stats.bounded, ['evil']);
  assert.ok(stats.norms.evil > 50 * S);
  // against the same round where the attacker sent no change at all, the aggregate moved by at most p_evil·S
  const still = ruledAverage('fedavg', prev, [...ups.slice(0, 3), { ...ups[3], factors: prev }], { normBound: S }, undefined).next;
  assert.ok(norm(diff(flat(next, ['a', 'b']), flat(still, ['a', 'b']))) <= p[3] * S * (1 + 1e-6));
});

test('trimmed_mean with β = 0.2 ignores one outlier among five clients (ffa B): its size does not matter, and the result is the slow reference', () => {
  const prev = randomFactors(12, gqaModules(4), ['a', 'b']);
  const honest = [13, 14, 15, 16].map((s, i) => client(`c${i}`, 10 + i, prev, ['b'], s));
  // the attacker shifts every coordinate of B by +k
  const evil = (k: number) => ({ client: 'evil', numExamples: 10, scale: 2, factors: new Map([...prev].map(([path, m]) => [path, { ...m, a: undefined, b: Float32Array.from(m.b!, (x) => x + k) }])) as FactorSet });
  const at = (k: number) => ruledAverage('ffa', prev, [...honest, evil(k)], { rule: 'trimmed_mean', beta: 0.2 }, undefined).next;
  const x = flat(at(1e3), ['b']);
  assert.deepEqual(flat(at(1e6), ['b']), x, 'the outlier is cut at every coordinate, whatever its size');
  const p0 = flat(prev, ['b']);
  const cols = [...honest, evil(1e3)].map((u) => diff(flat(u.factors, ['b']), p0));
  p0.forEach((v, i) => {
    const sorted = cols.map((c) => c[i]).sort((a, b) => a - b);
    const want = v + (sorted[1] + sorted[2] + sorted[3]) / 3;
    assert.ok(Math.abs(x[i] - want) < 1e-6, `coordinate ${i}`);
  });
});

test('median is coordinate-wise over the clients (fedsb R), for odd and even counts, against a slow reference', () => {
  const mods = gqaModules(4);
  const prev = randomFactors(18, mods, ['a', 'b', 'r']);
  for (const K of [4, 5]) {
    const ups = Array.from({ length: K }, (_, k) => client(`c${k}`, 5 + k, prev, ['r'], 20 + k, k === 0 ? 50 : 1));
    const got = flat(ruledAverage('fedsb', prev, ups, { rule: 'median' }, undefined).next, ['r']);
    const p0 = flat(prev, ['r']);
    const cols = ups.map((u) => diff(flat(u.factors, ['r']), p0));
    p0.forEach((v, i) => {
      const s = cols.map((c) => c[i]).sort((a, b) => a - b);
      const med = K % 2 ? s[(K - 1) / 2] : (s[K / 2 - 1] + s[K / 2]) / 2;
      assert.ok(Math.abs(got[i] - (v + med)) < 1e-6);
    });
  }
});

/** Krum against dense ΔW matrices: scores from explicit out×in differences. */
function denseKrum(dws: Map<string, number[][]>[], f: number, m: number): number[] {
  const K = dws.length;
  const d2 = dws.map((x) => dws.map((y) => [...x.keys()].reduce((s, k) => s + frob(add(x.get(k)!, y.get(k)!, -1)) ** 2, 0)));
  const scores = d2.map((row, i) => row.filter((_, j) => j !== i).sort((a, b) => a - b).slice(0, K - f - 2).reduce((s, v) => s + v, 0));
  return scores.map((s, i) => [s, i]).sort((a, b) => a[0] - b[0] || a[1] - b[1]).slice(0, m).map(([, i]) => i).sort((a, b) => a - b);
}

test('krum and multi-krum select by ΔW distances as a dense reference does, and keep a scale:100 client out (fedavg, ffa, fedsb, flora)', () => {
  const mods = gqaModules(3);
  for (const method of ['fedavg', 'ffa', 'fedsb'] as const) {
    const keys: Key[] = method === 'fedavg' ? ['a', 'b'] : method === 'ffa' ? ['b'] : ['r'];
    const prev = randomFactors(30, mods, ['a', 'b', ...(method === 'fedsb' ? (['r'] as Key[]) : [])]);
    const ups = Array.from({ length: 6 }, (_, k) => client(`c${k}`, 10 + k, prev, keys, 31 + k, k === 2 ? 100 : 1));
    const dense = ups.map((u) => {
      const full = new Map([...prev].map(([path, m]) => [path, { ...m, ...Object.fromEntries(keys.map((w) => [w, u.factors.get(path)![w]])) }]));
      return deltas(full, u.scale);
    });
    for (const m of [1, 3]) {
      const { stats, next } = ruledAverage(method, prev, ups, { rule: 'krum', f: 1, m }, undefined);
      const want = denseKrum(dense, 1, m);
      assert.deepEqual(stats.selected, want.map((k) => `c${k}`), `${method} m=${m}`);
      assert.ok(!stats.selected!.includes('c2'), `${method}: the scaled client is not selected`);
      if (m === 3) {
        // the example-weighted mean of the selected updates
        const p0 = flat(prev, keys);
        const total = want.reduce((s, k) => s + ups[k].numExamples, 0);
        const exp = p0.map((v, i) => v + want.reduce((s, k) => s + (ups[k].numExamples / total) * (flat(ups[k].factors, keys)[i] - v), 0));
        flat(next, keys).forEach((v, i) => assert.ok(Math.abs(v - exp[i]) < 1e-6));
      }
    }
  }
  // flora: ΔW_k = s_k·B_k·A_k
  const fl = Array.from({ length: 5 }, (_, k) => ({ client: `f${k}`, numExamples: 5, factors: randomFactors(40 + k, mods, ['a', 'b'], undefined, k === 4 ? 10 : 0.3), scale: 2 }));
  const { stats } = ruledFlora(undefined, fl, 64, { rule: 'krum', f: 1, m: 2 }, undefined);
  assert.deepEqual(stats.selected, denseKrum(fl.map((u) => deltas(u.factors, 2)), 1, 2).map((k) => `f${k}`));
  assert.ok(!stats.selected!.includes('f4'));
});

test('coordinate-wise rules are refused for fedavg and flora, whose clients factors are not in one basis', () => {
  const prev = randomFactors(50, gqaModules(2), ['a', 'b']);
  const ups = [client('c1', 1, prev, ['a', 'b'], 51), client('c2', 1, prev, ['a', 'b'], 52)];
  assert.throws(() => ruledAverage('fedavg', prev, ups, { rule: 'median' }, undefined), withCode('FED_ROBUST_UNSUPPORTED'));
  assert.throws(() => ruledFlora(undefined, ups, 64, { rule: 'trimmed_mean', beta: 0.1 }, undefined), withCode('FED_ROBUST_UNSUPPORTED'));
});

test("flora under norm_bound scales B_k so that ‖s_k·B_k·A_k‖_F ≤ S, then stacks as FLoRA does", () => {
  const mods = gqaModules(3);
  const ups = [0, 1, 2].map((k) => ({ client: `f${k}`, numExamples: 3 + k, factors: randomFactors(60 + k, mods, ['a', 'b'], undefined, k === 1 ? 5 : 0.2), scale: 2 }));
  const dense = (set: FactorSet, s: number) => [...deltas(set, s).values()].reduce((t, d) => t + frob(d) ** 2, 0) ** 0.5;
  const S = 1.01 * Math.max(dense(ups[0].factors, 2), dense(ups[2].factors, 2));
  const { global, stats } = ruledFlora(undefined, ups, 64, { normBound: S }, undefined);
  // slow reference: scale each B_k by min(1, S / ‖s B A‖) with dense norms, then plain FLoRA
  const bounded = ups.map((u) => {
    const c = Math.min(1, S / dense(u.factors, u.scale));
    return { ...u, factors: new Map([...u.factors].map(([k, m]) => [k, { ...m, b: Float32Array.from(m.b!, (x) => x * c) }])) as FactorSet };
  });
  assert.deepEqual(stats.bounded, ['f1']);
  const want = aggregateFlora(undefined, bounded, 64).global;
  for (const [k, m] of want) {
    const got = global.get(k)!;
    got.b!.forEach((v, i) => assert.ok(Math.abs(v - m.b![i]) < 1e-5));
    got.a!.forEach((v, i) => assert.ok(Math.abs(v - m.a![i]) < 1e-5));
  }
  // the bounded client's block of the stacked adapter: ‖p_k·s_k·B_k·A_k‖ ≤ p_k·S
  assert.ok(stats.norms.f1 > S);
});

test("flora under dp clips each client's (A_k − A⁰_k, B_k) to C, with its fresh A⁰ recomputed from the round seed, weights 1/m (σ = 0)", () => {
  const mods = gqaModules(3);
  const seeds = { f0: 101, f1: 202 };
  const ups = (['f0', 'f1'] as const).map((id, k) => {
    const dir = randomFactors(70 + k, mods, ['a', 'b'], undefined, k === 1 ? 3 : 0.01);
    const factors: FactorSet = new Map([...dir].map(([p, m]) => [p, { ...m, a: Float32Array.from(seededLoraA(seeds[id], m), (x, i) => x + m.a![i]) }]));
    return { client: id, numExamples: 4, factors, scale: 2 };
  });
  const C = 0.5;
  const { global, stats } = ruledFlora(undefined, ups, 64, undefined, dp({ clipNorm: C, denominator: 3, floraSeeds: seeds }));
  assert.deepEqual(stats.clipped, ['f1']);
  const reference = ups.map((u) => {
    const mods2 = [...u.factors.values()];
    const parts = mods2.flatMap((m) => [...Array.from(m.a!, (x, i) => x - seededLoraA(seeds[u.client as 'f0' | 'f1'], m)[i]), ...Array.from(m.b!)]);
    const c = Math.min(1, C / norm(parts));
    return {
      ...u,
      factors: new Map(mods2.map((m) => {
        const a0 = seededLoraA(seeds[u.client as 'f0' | 'f1'], m);
        return [m.modulePath, { ...m, a: Float32Array.from(m.a!, (x, i) => a0[i] + c * (x - a0[i])), b: Float32Array.from(m.b!, (x) => c * x) }];
      })) as FactorSet,
    };
  });
  const want = aggregateFlora(undefined, reference, 64, [1 / 3, 1 / 3]).global;
  for (const [k, m] of want) {
    global.get(k)!.a!.forEach((v, i) => assert.ok(Math.abs(v - m.a![i]) < 1e-5));
    global.get(k)!.b!.forEach((v, i) => assert.ok(Math.abs(v - m.b![i]) < 1e-5));
  }
  assert.throws(() => ruledFlora(undefined, ups, 64, undefined, dp({ clipNorm: C, denominator: 3 })), withCode('FED_DP_INVALID'));
});
