/**
 * Slow, obvious float64 references for the federation tests: plain triple-loop products and
 * Frobenius norms on explicit out×in matrices, and random test matrices.
 */
import { SeededRandom } from '../../src/model/synthetic/seeded-random.js';
import type { Matrix } from '../../src/federation/low-rank.js';

/** Row-major [rows][cols] as nested arrays, so nothing here shares code with src. */
export type Dense = number[][];

export function randomDense(rng: SeededRandom, rows: number, cols: number, std = 1): Dense {
  return Array.from({ length: rows }, () => Array.from({ length: cols }, () => rng.normal() * std));
}

/** A rows×cols matrix of rank `rank` (a product of two random factors). */
export function rankDeficientDense(rng: SeededRandom, rows: number, cols: number, rank: number): Dense {
  return mul(randomDense(rng, rows, rank), randomDense(rng, rank, cols));
}

export function mul(x: Dense, y: Dense): Dense {
  const m = x.length;
  const k = y.length;
  const n = y[0]?.length ?? 0;
  const out: Dense = Array.from({ length: m }, () => new Array<number>(n).fill(0));
  for (let i = 0; i < m; i++) {
    for (let j = 0; j < n; j++) {
      let s = 0;
      for (let p = 0; p < k; p++) s += x[i][p] * y[p][j];
      out[i][j] = s;
    }
  }
  return out;
}

export function transposeDense(x: Dense): Dense {
  return (x[0] ?? []).map((_, j) => x.map((row) => row[j]));
}

export function add(x: Dense, y: Dense, cy = 1): Dense {
  return x.map((row, i) => row.map((v, j) => v + cy * y[i][j]));
}

export function scaleDense(x: Dense, s: number): Dense {
  return x.map((row) => row.map((v) => v * s));
}

export function zerosDense(rows: number, cols: number): Dense {
  return Array.from({ length: rows }, () => new Array<number>(cols).fill(0));
}

export function frob(x: Dense): number {
  let s = 0;
  for (const row of x) for (const v of row) s += v * v;
  return Math.sqrt(s);
}

/** ‖x − y‖_F / max(‖y‖_F, tiny). */
export function relErr(x: Dense, y: Dense): number {
  return frob(add(x, y, -1)) / Math.max(frob(y), 1e-300);
}

export function toDense(m: Matrix): Dense {
  return Array.from({ length: m.rows }, (_, i) => Array.from(m.data.subarray(i * m.cols, (i + 1) * m.cols)));
}

/** From a row-major typed array (e.g. a Float32Array factor) of the given shape. */
export function denseOf(rows: number, cols: number, data: ArrayLike<number>): Dense {
  if (data.length !== rows * cols) throw new RangeError(`denseOf: ${data.length} values for ${rows}×${cols}`);
  return Array.from({ length: rows }, (_, i) => Array.from({ length: cols }, (_, j) => data[i * cols + j]));
}

export function fromDense(x: Dense): Matrix {
  const rows = x.length;
  const cols = x[0]?.length ?? 0;
  return { rows, cols, data: Float64Array.from(x.flat()) };
}

/** max |XᵀX − I| over the columns of X. */
export function orthonormalityError(x: Dense): number {
  const g = mul(transposeDense(x), x);
  let worst = 0;
  for (let i = 0; i < g.length; i++) for (let j = 0; j < g.length; j++) worst = Math.max(worst, Math.abs(g[i][j] - (i === j ? 1 : 0)));
  return worst;
}

/**
 * Singular values of X by the obvious route: eigenvalues of the symmetric XᵀX by cyclic
 * two-sided Jacobi rotations (no code shared with the one-sided SVD under test), σ = √λ.
 */
export function singularValuesReference(x: Dense): number[] {
  const small = x.length < (x[0]?.length ?? 0) ? mul(x, transposeDense(x)) : mul(transposeDense(x), x);
  const a = small.map((r) => [...r]);
  const n = a.length;
  for (let sweep = 0; sweep < 100; sweep++) {
    let off = 0;
    for (let p = 0; p < n; p++) for (let q = p + 1; q < n; q++) off += a[p][q] * a[p][q];
    if (off < 1e-30) break;
    for (let p = 0; p < n; p++) {
      for (let q = p + 1; q < n; q++) {
        if (a[p][q] === 0) continue;
        const theta = (a[q][q] - a[p][p]) / (2 * a[p][q]);
        const t = Math.sign(theta || 1) / (Math.abs(theta) + Math.sqrt(theta * theta + 1));
        const c = 1 / Math.sqrt(t * t + 1);
        const s = t * c;
        for (let k = 0; k < n; k++) {
          const akp = a[k][p];
          const akq = a[k][q];
          a[k][p] = c * akp - s * akq;
          a[k][q] = s * akp + c * akq;
        }
        for (let k = 0; k < n; k++) {
          const apk = a[p][k];
          const aqk = a[q][k];
          a[p][k] = c * apk - s * aqk;
          a[q][k] = s * apk + c * aqk;
        }
      }
    }
  }
  return a.map((row, i) => Math.sqrt(Math.max(0, row[i]))).sort((u, v) => v - u);
}
