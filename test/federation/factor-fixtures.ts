/**
 * Module skeletons and random factor sets for the federation tests, and the dense ΔW of a
 * module computed the obvious way.
 */
import { projectionModulePath, type ProjectionName } from '../../src/model/architecture/llama-weights.js';
import { SeededRandom } from '../../src/model/synthetic/seeded-random.js';
import { factorShape, type FactorSet, type ModuleFactors } from '../../src/federation/lora-factors.js';
import { add, denseOf, frob, mul, scaleDense, zerosDense, type Dense } from './dense-reference.js';

/** Projection shapes of TINY_CONFIGS.gqa (hidden 32, intermediate 48, 4 heads, 2 kv heads, head_dim 8). */
const GQA_SHAPES: Record<ProjectionName, [number, number]> = {
  q_proj: [32, 32],
  k_proj: [32, 16],
  v_proj: [32, 16],
  o_proj: [32, 32],
  gate_proj: [32, 48],
  up_proj: [32, 48],
  down_proj: [48, 32],
};

/** Skeletons (no factors) of these projections in these layers of TINY_CONFIGS.gqa, rank r. */
export function gqaModules(rank: number, projs: ProjectionName[] = ['q_proj', 'k_proj', 'down_proj'], layers = [0, 1]): ModuleFactors[] {
  const out: ModuleFactors[] = [];
  for (const layer of layers) {
    for (const proj of projs) {
      const [inFeatures, outFeatures] = GQA_SHAPES[proj];
      out.push({ modulePath: projectionModulePath(layer, proj), layer, proj, inFeatures, outFeatures, rank });
    }
  }
  return out;
}

/** Random factors `which` for every module, at `rank` (or each module's own rank). */
export function randomFactors(seed: number, modules: readonly ModuleFactors[], which: ('a' | 'b' | 'r')[], rank?: number, std = 0.3): FactorSet {
  const rng = new SeededRandom(seed);
  const set: FactorSet = new Map();
  for (const m0 of modules) {
    const m: ModuleFactors = { modulePath: m0.modulePath, layer: m0.layer, proj: m0.proj, inFeatures: m0.inFeatures, outFeatures: m0.outFeatures, rank: rank ?? m0.rank };
    for (const w of which) {
      const [rows, cols] = factorShape(m, w === 'a' ? 'A' : w === 'b' ? 'B' : 'R');
      m[w] = rng.normalArray(rows * cols, std);
    }
    set.set(m.modulePath, m);
  }
  return set;
}

/** ΔW = s·B·A, or s·B·R·A when R is there (and `useR`), as an explicit out×in matrix. */
export function denseDelta(m: ModuleFactors, s = 1, useR = m.r !== undefined): Dense {
  const b = denseOf(m.outFeatures, m.rank, m.b!);
  const a = denseOf(m.rank, m.inFeatures, m.a!);
  const core = useR ? mul(b, denseOf(m.rank, m.rank, m.r!)) : b;
  return scaleDense(mul(core, a), s);
}

/** Σ_k c_k·ΔW_k per module path. */
export function denseSum(terms: { coef: number; delta: Map<string, Dense> }[], modules: readonly ModuleFactors[]): Map<string, Dense> {
  const out = new Map<string, Dense>();
  for (const m of modules) {
    let acc = zerosDense(m.outFeatures, m.inFeatures);
    for (const t of terms) acc = add(acc, scaleDense(t.delta.get(m.modulePath)!, t.coef));
    out.set(m.modulePath, acc);
  }
  return out;
}

/** ‖X − Y‖_F / ‖Y‖_F over all modules together (square roots of summed squares). */
export function relErrAll(x: Map<string, Dense>, y: Map<string, Dense>): number {
  let num = 0;
  let den = 0;
  for (const [k, yk] of y) {
    num += frob(add(x.get(k)!, yk, -1)) ** 2;
    den += frob(yk) ** 2;
  }
  return Math.sqrt(num / den);
}

export function deltas(set: FactorSet, s = 1): Map<string, Dense> {
  return new Map([...set].map(([k, m]) => [k, denseDelta(m, s)]));
}

/** p_k = n_k / Σ n, computed independently of the code under test. */
export function shares(ns: number[]): number[] {
  const total = ns.reduce((a, b) => a + b, 0);
  return ns.map((n) => n / total);
}
