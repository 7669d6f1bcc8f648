import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { FederationError, UpdateRejectedError } from '../../src/errors.js';
import { fedsbGradientInit, fedsbRandomInit, loraSbStepSize } from '../../src/federation/aggregators/fedsb-init.js';
import { SeededRandom } from '../../src/model/synthetic/seeded-random.js';
import { add, denseOf, frob, orthonormalityError, randomDense, singularValuesReference, transposeDense } from './dense-reference.js';
import { denseDelta, gqaModules } from './factor-fixtures.js';

// q_proj 32→32, k_proj 32→16 (out < in), down_proj 48→32 (out > in)
const modules = gqaModules(0, ['q_proj', 'k_proj', 'down_proj'], [0]);

function gradients(seed: number, lowRank = false): Map<string, Float32Array> {
  const rng = new SeededRandom(seed);
  return new Map(
    modules.map((m) => {
      const g = lowRank
        ? // G = u·vᵀ: sign(G) = sign(u)·sign(v)ᵀ has rank 1
          (() => {
            const u = randomDense(rng, m.outFeatures, 1);
            const v = randomDense(rng, 1, m.inFeatures);
            return u.flatMap((row) => v[0].map((x) => row[0] * x));
          })()
        : randomDense(rng, m.outFeatures, m.inFeatures).flat();
      return [m.modulePath, Float32Array.from(g)];
    }),
  );
}

/** ΔW₀ = −η·sign(G), the LoRA-SB approximated first update, densely. */
function firstUpdate(g: Float32Array, rows: number, cols: number, eta: number) {
  return denseOf(rows, cols, Array.from(g, (x) => -eta * Math.sign(x)));
}

describe('Fed-SB initialisation', () => {
  it('loraSbStepSize is lr / (warmup_ratio · total_steps), as the LoRA-SB training scripts compute eff_lr', () => {
    assert.equal(loraSbStepSize(2e-3, 0.02, 100), 2e-3 / 2);
    assert.throws(() => loraSbStepSize(1e-3, 0, 100), (e: unknown) => e instanceof FederationError && e.code === 'FED_JOB_INVALID');
  });

  for (const rank of [2, 4, 16]) {
    it(`gradient init at rank ${rank}: B·R·A is the dense best rank-${rank} approximation of −η·sign(G) (out = in, out < in, out > in), B and A orthonormal, R = diag(σ)`, () => {
      const eta = loraSbStepSize(1e-3, 0.02, 50);
      const g = gradients(rank);
      const init = fedsbGradientInit(g, modules, rank, { stepSize: eta });
      for (const m of modules) {
        const f = init.get(m.modulePath)!;
        assert.equal(f.rank, rank);
        const w = firstUpdate(g.get(m.modulePath)!, m.outFeatures, m.inFeatures, eta);
        const sig = singularValuesReference(w);
        // R is diagonal, holding the top singular values in order
        const r = denseOf(rank, rank, f.r!);
        for (let i = 0; i < rank; i++) {
          for (let j = 0; j < rank; j++) if (i !== j) assert.equal(r[i][j], 0);
          assert.ok(Math.abs(r[i][i] - sig[i]) < 1e-5 * sig[0], `${m.modulePath} σ_${i}: ${r[i][i]} vs ${sig[i]}`);
        }
        assert.ok(orthonormalityError(denseOf(m.outFeatures, rank, f.b!)) < 1e-5, 'B has orthonormal columns');
        assert.ok(orthonormalityError(transposeDense(denseOf(rank, m.inFeatures, f.a!))) < 1e-5, 'A has orthonormal rows');
        // Eckart–Young: the residual of the best rank-r approximation is the dropped energy
        const total = sig.reduce((s, x) => s + x * x, 0);
        const dropped = sig.slice(rank).reduce((s, x) => s + x * x, 0);
        const resid = frob(add(w, denseDelta(f), -1));
        assert.ok(Math.abs(resid ** 2 - dropped) < 1e-5 * total, `${m.modulePath}: residual² ${resid ** 2} vs dropped ${dropped}`);
      }
    });
  }

  it('gradient init through the randomized range finder (rank + oversample < min(in, out)) recovers a rank-1 sign(G) exactly', () => {
    const eta = 0.01;
    const g = gradients(77, true);
    const init = fedsbGradientInit(g, modules, 3, { stepSize: eta, oversample: 2 }); // q = 5 < 16
    for (const m of modules) {
      const w = firstUpdate(g.get(m.modulePath)!, m.outFeatures, m.inFeatures, eta);
      const err = frob(add(w, denseDelta(init.get(m.modulePath)!), -1)) / frob(w);
      assert.ok(err < 1e-5, `${m.modulePath}: relative error ${err}`);
    }
  });

  it('gradient init through the randomized range finder keeps nearly the optimal energy of a full-rank sign(G)', () => {
    const eta = 0.01;
    const g = gradients(78);
    const rank = 4;
    const init = fedsbGradientInit(g, modules, rank, { stepSize: eta, oversample: 4, powerIterations: 10 });
    for (const m of modules) {
      const w = firstUpdate(g.get(m.modulePath)!, m.outFeatures, m.inFeatures, eta);
      const best = singularValuesReference(w).slice(0, rank).reduce((s, x) => s + x * x, 0);
      const got = frob(denseDelta(init.get(m.modulePath)!)) ** 2;
      assert.ok(got <= best * (1 + 1e-6) && got >= 0.97 * best, `${m.modulePath}: kept ${got} of the optimal ${best}`);
    }
  });

  it('gradient init refuses a missing, mis-sized or non-finite gradient and a rank above min(in, out)', () => {
    const g = gradients(1);
    const reason = (r: string) => (e: unknown) => e instanceof UpdateRejectedError && e.reason === r;
    const missing = new Map(g);
    missing.delete(modules[0].modulePath);
    assert.throws(() => fedsbGradientInit(missing, modules, 2, { stepSize: 1 }), reason('missing_tensor'));
    assert.throws(() => fedsbGradientInit(new Map(g).set(modules[0].modulePath, new Float32Array(3)), modules, 2, { stepSize: 1 }), reason('shape_mismatch'));
    const nan = Float32Array.from(g.get(modules[1].modulePath)!);
    nan[5] = NaN;
    assert.throws(() => fedsbGradientInit(new Map(g).set(modules[1].modulePath, nan), modules, 2, { stepSize: 1 }), reason('not_finite'));
    assert.throws(() => fedsbGradientInit(g, modules, 17, { stepSize: 1 }), (e: unknown) => e instanceof FederationError && e.code === 'FED_RANK_TOO_LARGE' && e.message.includes('k_proj'));
  });

  it('random init: B with orthonormal columns, A with orthonormal rows, R = 0; the same for the same seed, different across seeds and modules', () => {
    const init = fedsbRandomInit(3, modules, 8);
    for (const m of modules) {
      const f = init.get(m.modulePath)!;
      assert.ok(orthonormalityError(denseOf(m.outFeatures, 8, f.b!)) < 1e-5);
      assert.ok(orthonormalityError(transposeDense(denseOf(8, m.inFeatures, f.a!))) < 1e-5);
      assert.ok(f.r!.every((x) => x === 0));
    }
    const again = fedsbRandomInit(3, modules, 8);
    const other = fedsbRandomInit(4, modules, 8);
    const q = modules[0].modulePath;
    assert.deepEqual(again.get(q)!.b, init.get(q)!.b);
    assert.notDeepEqual(other.get(q)!.b, init.get(q)!.b);
    const layer1 = fedsbRandomInit(3, gqaModules(0, ['q_proj'], [1]), 8).get('model.layers.1.self_attn.q_proj')!;
    assert.notDeepEqual(layer1.b, init.get(q)!.b);
    assert.throws(() => fedsbRandomInit(3, modules, 17), (e: unknown) => e instanceof FederationError && e.code === 'FED_RANK_TOO_LARGE');
  });
});
