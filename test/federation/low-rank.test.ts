import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { SeededRandom } from '../../src/model/synthetic/seeded-random.js';
import {
  frobeniusOfSum,
  hstack,
  matmul,
  matmulTN,
  qr,
  svd,
  transpose,
  truncateLowRank,
  vstack,
} from '../../src/federation/low-rank.js';
import { truncatedSvd } from '../../src/federation/aggregators/fedsb-init.js';
import {
  add,
  frob,
  fromDense,
  mul,
  orthonormalityError,
  randomDense,
  rankDeficientDense,
  relErr,
  scaleDense,
  singularValuesReference,
  toDense,
  transposeDense,
  zerosDense,
  type Dense,
} from './dense-reference.js';

/** [rows, cols, rank of the test matrix (≤ min: full or deficient)] */
const SHAPES: [number, number, number][] = [
  [1, 1, 1],
  [5, 3, 3],
  [3, 5, 3],
  [12, 12, 12],
  [17, 9, 4],
  [9, 17, 2],
  [30, 8, 8],
  [8, 30, 0],
];

function testMatrix(seed: number, rows: number, cols: number, rank: number): Dense {
  const rng = new SeededRandom(seed);
  return rank === Math.min(rows, cols) ? randomDense(rng, rows, cols) : rank === 0 ? zerosDense(rows, cols) : rankDeficientDense(rng, rows, cols, rank);
}

function diag(values: ArrayLike<number>): Dense {
  return Array.from({ length: values.length }, (_, i) => Array.from({ length: values.length }, (_, j) => (i === j ? values[i] : 0)));
}

describe('low-rank dense helpers against triple-loop references', () => {
  it('matmul, matmulTN and transpose equal the triple-loop product for every shape', () => {
    const rng = new SeededRandom(1);
    for (const [m, k, n] of [[1, 1, 1], [3, 4, 5], [7, 2, 9], [16, 16, 3]]) {
      const x = randomDense(rng, m, k);
      const y = randomDense(rng, k, n);
      assert.ok(relErr(toDense(matmul(fromDense(x), fromDense(y))), mul(x, y)) < 1e-14);
      const xt = transposeDense(x);
      assert.ok(relErr(toDense(matmulTN(fromDense(xt), fromDense(y))), mul(x, y)) < 1e-14);
      assert.deepEqual(toDense(transpose(fromDense(x))), xt);
    }
  });

  it('vstack and hstack place the blocks where [X; Y] and [X, Y] have them', () => {
    const x = [[1, 2], [3, 4]];
    const y = [[5, 6]];
    assert.deepEqual(toDense(vstack([fromDense(x), fromDense(y)])), [[1, 2], [3, 4], [5, 6]]);
    assert.deepEqual(toDense(hstack([fromDense(x), fromDense([[7], [8]])])), [[1, 2, 7], [3, 4, 8]]);
  });

  for (const [m, n, r] of SHAPES) {
    it(`qr of a ${m}×${n} matrix of rank ${r}: Q orthonormal, R upper triangular, Q·R = X`, () => {
      const x = testMatrix(10 + m * n, m, n, r);
      const { q, r: rr } = qr(fromDense(x));
      const p = Math.min(m, n);
      assert.deepEqual([q.rows, q.cols, rr.rows, rr.cols], [m, p, p, n]);
      assert.ok(orthonormalityError(toDense(q)) < 1e-13, `QᵀQ − I = ${orthonormalityError(toDense(q))}`);
      const rd = toDense(rr);
      for (let i = 0; i < p; i++) for (let j = 0; j < i; j++) assert.equal(rd[i][j], 0);
      assert.ok(frob(add(mul(toDense(q), rd), x, -1)) <= 1e-13 * Math.max(1, frob(x)));
    });

    it(`svd of a ${m}×${n} matrix of rank ${r}: U, V orthonormal, σ descending and equal to √eig(XᵀX), U·Σ·Vᵀ = X`, () => {
      const x = testMatrix(20 + m * n, m, n, r);
      const { u, s, v } = svd(fromDense(x));
      const p = Math.min(m, n);
      assert.deepEqual([u.rows, u.cols, s.length, v.rows, v.cols], [m, p, p, n, p]);
      assert.ok(orthonormalityError(toDense(u)) < 1e-12, `UᵀU − I = ${orthonormalityError(toDense(u))}`);
      assert.ok(orthonormalityError(toDense(v)) < 1e-12, `VᵀV − I = ${orthonormalityError(toDense(v))}`);
      for (let i = 1; i < p; i++) assert.ok(s[i] <= s[i - 1]);
      const ref = singularValuesReference(x);
      // the reference squares X, so compare σ² against λ (zero σ of a deficient X come out ~1e-7 there)
      const top = Math.max(1, ref[0] ** 2);
      for (let i = 0; i < p; i++) assert.ok(Math.abs(s[i] ** 2 - ref[i] ** 2) < 1e-12 * top, `σ_${i} ${s[i]} vs ${ref[i]}`);
      const back = mul(mul(toDense(u), diag(s)), transposeDense(toDense(v)));
      assert.ok(frob(add(back, x, -1)) <= 1e-12 * Math.max(1, frob(x)));
    });
  }

  for (const [m, n, k, r] of [[40, 30, 5, 30], [30, 40, 3, 30], [25, 25, 25, 25], [40, 30, 4, 6]]) {
    it(`truncatedSvd of a ${m}×${n} matrix (rank ${r}, decaying spectrum) to rank ${k} matches the dense top-${k} singular triplets`, () => {
      const rng = new SeededRandom(m + n + k);
      // X = P·diag(2^-i)·Qᵀ: a clear gap so the randomized range finder converges
      const p = svd(fromDense(randomDense(rng, m, r))).u;
      const q = svd(fromDense(randomDense(rng, n, r))).u;
      const sig = Array.from({ length: r }, (_, i) => 2 ** -i);
      const x = mul(mul(toDense(p), diag(sig)), transposeDense(toDense(q)));
      const t = truncatedSvd(fromDense(x), k);
      assert.deepEqual([t.u.cols, t.s.length, t.v.cols], [k, k, k]);
      for (let i = 0; i < k; i++) assert.ok(Math.abs(t.s[i] - sig[i]) < 1e-9, `σ_${i} ${t.s[i]} vs ${sig[i]}`);
      const approx = mul(mul(toDense(t.u), diag(t.s)), transposeDense(toDense(t.v)));
      const best = mul(mul(toDense(p).map((row) => row.slice(0, k)), diag(sig.slice(0, k))), transposeDense(toDense(q).map((row) => row.slice(0, k))));
      assert.ok(frob(add(approx, best, -1)) < 1e-9);
    });
  }

  // [out, R, in, k]: tall and wide, k below, at and above the stack rank, rank-deficient stacks
  const TRUNCATIONS: [number, number, number, number, string][] = [
    [20, 12, 16, 4, 'full-rank factors'],
    [16, 12, 20, 8, 'full-rank factors'],
    [10, 24, 14, 6, 'stack rank R above out and in'],
    [20, 12, 16, 12, 'k = R (nothing dropped)'],
    [20, 6, 16, 9, 'k above R'],
    [20, 12, 16, 5, 'B·A of true rank 3 (repeated factor blocks)'],
    [12, 8, 9, 3, 'B·A = 0'],
  ];
  for (const [out, rr, inF, k, what] of TRUNCATIONS) {
    it(`truncateLowRank of B [${out},${rr}]·A [${rr},${inF}] to k=${k} (${what}) is the dense best rank-k approximation and keptFraction = Σ_{i≤k}σ²/Σσ²`, () => {
      const rng = new SeededRandom(out * 31 + rr * 7 + k);
      let b = randomDense(rng, out, rr);
      let a = randomDense(rng, rr, inF);
      if (what.includes('true rank 3')) {
        const b3 = randomDense(rng, out, 3);
        const a3 = randomDense(rng, 3, inF);
        b = b.map((_, i) => Array.from({ length: rr }, (_, j) => b3[i][j % 3] * (1 + Math.floor(j / 3))));
        a = Array.from({ length: rr }, (_, j) => a3[j % 3].map((v) => v / (1 + Math.floor(j / 3))));
      }
      if (what === 'B·A = 0') a = zerosDense(rr, inF);
      const w = mul(b, a); // the dense out×in product the fast path never forms
      const t = truncateLowRank(fromDense(b), fromDense(a), k);
      const sig = singularValuesReference(w);
      const expectRank = Math.min(k, rr, out, inF);
      assert.equal(t.rank, expectRank);
      assert.deepEqual([t.b.rows, t.b.cols, t.a.rows, t.a.cols], [out, expectRank, expectRank, inF]);
      const total = sig.reduce((s, x) => s + x * x, 0);
      const kept = sig.slice(0, expectRank).reduce((s, x) => s + x * x, 0);
      const keptRef = total === 0 ? 1 : kept / total;
      assert.ok(Math.abs(t.keptFraction - keptRef) < 1e-10, `keptFraction ${t.keptFraction} vs ${keptRef}`);
      // Eckart–Young: the error of the best rank-k approximation is exactly the dropped energy
      const resid = frob(add(w, mul(toDense(t.b), toDense(t.a)), -1));
      assert.ok(Math.abs(resid * resid - (total - kept)) < 1e-9 * Math.max(1, total), `residual² ${resid * resid} vs dropped ${total - kept}`);
      // σ split symmetrically: ‖B'_i‖² = ‖A'_i‖² = σ_i per rank-one component
      const bd = toDense(t.b);
      const ad = toDense(t.a);
      for (let i = 0; i < expectRank; i++) {
        const bn2 = bd.reduce((s, row) => s + row[i] * row[i], 0);
        const an2 = ad[i].reduce((s, v) => s + v * v, 0);
        assert.ok(Math.abs(bn2 - sig[i]) < 1e-8 * Math.max(1, sig[0]), `‖B'_${i}‖² ${bn2} vs σ ${sig[i]}`);
        assert.ok(Math.abs(an2 - sig[i]) < 1e-8 * Math.max(1, sig[0]), `‖A'_${i}‖² ${an2} vs σ ${sig[i]}`);
      }
    });
  }

  it('frobeniusOfSum equals ‖Σ c_j B_j A_j‖_F of the dense sum, for mixed ranks, signs, zero coefficients and exact cancellation', () => {
    const rng = new SeededRandom(99);
    const out = 13;
    const inF = 11;
    const ranks = [4, 8, 1, 16];
    const coefs = [0.3, -1.2, 0, 2.5];
    const terms = ranks.map((r, j) => ({ coef: coefs[j], b: randomDense(rng, out, r), a: randomDense(rng, r, inF) }));
    let dense = zerosDense(out, inF);
    for (const t of terms) dense = add(dense, scaleDense(mul(t.b, t.a), t.coef));
    const fast = frobeniusOfSum(terms.map((t) => ({ coef: t.coef, b: fromDense(t.b), a: fromDense(t.a) })));
    assert.ok(Math.abs(fast - frob(dense)) < 1e-10 * frob(dense), `${fast} vs ${frob(dense)}`);
    // B·A − B·A = 0
    const t0 = { coef: 1, b: fromDense(terms[0].b), a: fromDense(terms[0].a) };
    assert.ok(frobeniusOfSum([t0, { ...t0, coef: -1 }]) < 1e-6 * frob(mul(terms[0].b, terms[0].a)));
    assert.equal(frobeniusOfSum([]), 0);
  });
});
