/**
 * Small dense float64 linear algebra for the federated aggregators: products, thin QR,
 * SVD, and operations on low-rank products B·A that never form the out×in matrix.
 *
 * Matrices are row-major: element (i, j) of an m×n matrix is data[i·n + j].
 */
import { SeededRandom } from '../model/synthetic/seeded-random.js';

export interface Matrix {
  rows: number;
  cols: number;
  /** [rows, cols] row-major */
  data: Float64Array;
}

export function zeros(rows: number, cols: number): Matrix {
  return { rows, cols, data: new Float64Array(rows * cols) };
}

/** Copies `data` (e.g. a Float32Array factor) into a float64 matrix of the given shape. */
export function matrix(rows: number, cols: number, data: ArrayLike<number>): Matrix {
  if (data.length !== rows * cols) throw new RangeError(`matrix: ${data.length} values for a ${rows}×${cols} matrix`);
  return { rows, cols, data: Float64Array.from(data) };
}

export function toFloat32(m: Matrix): Float32Array {
  return Float32Array.from(m.data);
}

/** C = X·Y, [m,k]·[k,n] → [m,n]; i-k-j loop order so the inner loop runs along rows. */
export function matmul(x: Matrix, y: Matrix): Matrix {
  if (x.cols !== y.rows) throw new RangeError(`matmul: [${x.rows}, ${x.cols}]·[${y.rows}, ${y.cols}]`);
  const { rows: m, cols: k } = x;
  const n = y.cols;
  const c = new Float64Array(m * n);
  for (let i = 0; i < m; i++) {
    const ci = i * n;
    for (let p = 0; p < k; p++) {
      const v = x.data[i * k + p];
      if (v === 0) continue;
      const yp = p * n;
      for (let j = 0; j < n; j++) c[ci + j] += v * y.data[yp + j];
    }
  }
  return { rows: m, cols: n, data: c };
}

/** Xᵀ·Y without forming Xᵀ: [k,m]ᵀ·[k,n] → [m,n]. */
export function matmulTN(x: Matrix, y: Matrix): Matrix {
  if (x.rows !== y.rows) throw new RangeError(`matmulTN: [${x.rows}, ${x.cols}]ᵀ·[${y.rows}, ${y.cols}]`);
  const { rows: k, cols: m } = x;
  const n = y.cols;
  const c = new Float64Array(m * n);
  for (let p = 0; p < k; p++) {
    for (let i = 0; i < m; i++) {
      const v = x.data[p * m + i];
      if (v === 0) continue;
      for (let j = 0; j < n; j++) c[i * n + j] += v * y.data[p * n + j];
    }
  }
  return { rows: m, cols: n, data: c };
}

export function transpose(x: Matrix): Matrix {
  const out = new Float64Array(x.rows * x.cols);
  for (let i = 0; i < x.rows; i++) for (let j = 0; j < x.cols; j++) out[j * x.rows + i] = x.data[i * x.cols + j];
  return { rows: x.cols, cols: x.rows, data: out };
}

export function scale(x: Matrix, s: number): Matrix {
  return { rows: x.rows, cols: x.cols, data: x.data.map((v) => v * s) };
}

/** [X; Y; …]: rows stacked (all with the same number of columns). */
export function vstack(parts: Matrix[]): Matrix {
  const cols = parts[0].cols;
  const rows = parts.reduce((n, p) => n + p.rows, 0);
  const out = new Float64Array(rows * cols);
  let off = 0;
  for (const p of parts) {
    if (p.cols !== cols) throw new RangeError(`vstack: ${p.cols} columns, expected ${cols}`);
    out.set(p.data, off);
    off += p.data.length;
  }
  return { rows, cols, data: out };
}

/** [X, Y, …]: columns side by side (all with the same number of rows). */
export function hstack(parts: Matrix[]): Matrix {
  return transpose(vstack(parts.map(transpose)));
}

/** Columns [from, to) of X. */
export function columns(x: Matrix, from: number, to: number): Matrix {
  const n = to - from;
  const out = new Float64Array(x.rows * n);
  for (let i = 0; i < x.rows; i++) out.set(x.data.subarray(i * x.cols + from, i * x.cols + to), i * n);
  return { rows: x.rows, cols: n, data: out };
}

/**
 * Thin Householder QR of X [m,n]: X = Q·R with p = min(m,n), Q [m,p] with orthonormal
 * columns and R [p,n] upper triangular (upper trapezoidal when n > m).
 *
 *   for j < p:  v = x_j[j:] + sign(x_jj)·‖x_j[j:]‖·e₁,  H_j = I − 2vvᵀ/(vᵀv),  X ← H_j X
 *   Q = H_0·H_1·…·H_{p−1}·I[:, :p]
 */
export function qr(x: Matrix): { q: Matrix; r: Matrix } {
  const { rows: m, cols: n } = x;
  const p = Math.min(m, n);
  const a = Float64Array.from(x.data); // reduced in place to R
  const vs: Float64Array[] = [];
  for (let j = 0; j < p; j++) {
    const v = new Float64Array(m - j);
    let norm2 = 0;
    for (let i = j; i < m; i++) {
      v[i - j] = a[i * n + j];
      norm2 += v[i - j] * v[i - j];
    }
    const norm = Math.sqrt(norm2);
    if (norm === 0) {
      vs.push(v); // zero column: H_j = I
      continue;
    }
    v[0] += v[0] >= 0 ? norm : -norm;
    const vtv = norm2 - a[j * n + j] * a[j * n + j] + v[0] * v[0];
    for (let c = j; c < n; c++) {
      let dot = 0;
      for (let i = j; i < m; i++) dot += v[i - j] * a[i * n + c];
      const f = (2 * dot) / vtv;
      for (let i = j; i < m; i++) a[i * n + c] -= f * v[i - j];
    }
    for (let i = 0; i < v.length; i++) v[i] /= Math.sqrt(vtv / 2); // now H_j = I − v vᵀ
    vs.push(v);
  }
  const r = zeros(p, n);
  for (let i = 0; i < p; i++) for (let c = i; c < n; c++) r.data[i * n + c] = a[i * n + c];
  // Q = H_0 … H_{p−1} applied to the first p columns of I, right to left.
  const q = zeros(m, p);
  for (let i = 0; i < p; i++) q.data[i * p + i] = 1;
  for (let j = p - 1; j >= 0; j--) {
    const v = vs[j];
    for (let c = 0; c < p; c++) {
      let dot = 0;
      for (let i = j; i < m; i++) dot += v[i - j] * q.data[i * p + c];
      if (dot === 0) continue;
      for (let i = j; i < m; i++) q.data[i * p + c] -= dot * v[i - j];
    }
  }
  return { q, r };
}

/**
 * Thin SVD X [m,n] = U·diag(σ)·Vᵀ with p = min(m,n): U [m,p], σ [p] descending, V [n,p],
 * by one-sided (Hestenes) Jacobi on the columns of X (or of Xᵀ when m < n). Each rotation
 * of columns (i, j) with α = ‖x_i‖², β = ‖x_j‖², γ = x_i·x_j makes them orthogonal:
 *   ζ = (β − α)/(2γ),  t = sign(ζ)/(|ζ| + √(1+ζ²)),  c = 1/√(1+t²),  s = c·t
 *   x_i ← c·x_i − s·x_j,  x_j ← s·x_i + c·x_j   (and the same on V)
 * until every pair is orthogonal to machine precision; then σ_i = ‖x_i‖, u_i = x_i/σ_i.
 * Columns of U for σ = 0 are completed to an orthonormal set, so U is always orthonormal.
 */
export function svd(x: Matrix): { u: Matrix; s: Float64Array; v: Matrix } {
  if (x.rows < x.cols) {
    const t = svd(transpose(x));
    return { u: t.v, s: t.s, v: t.u };
  }
  const { rows: m, cols: n } = x;
  const cols: Float64Array[] = []; // columns of X, rotated in place
  const vcols: Float64Array[] = [];
  for (let j = 0; j < n; j++) {
    const c = new Float64Array(m);
    for (let i = 0; i < m; i++) c[i] = x.data[i * n + j];
    cols.push(c);
    const e = new Float64Array(n);
    e[j] = 1;
    vcols.push(e);
  }
  const eps = 2.220446049250313e-16;
  for (let sweep = 0; sweep < 80; sweep++) {
    let rotated = false;
    for (let i = 0; i < n - 1; i++) {
      for (let j = i + 1; j < n; j++) {
        const xi = cols[i];
        const xj = cols[j];
        let alpha = 0;
        let beta = 0;
        let gamma = 0;
        for (let k = 0; k < m; k++) {
          alpha += xi[k] * xi[k];
          beta += xj[k] * xj[k];
          gamma += xi[k] * xj[k];
        }
        if (gamma === 0 || Math.abs(gamma) <= eps * Math.sqrt(alpha * beta)) continue;
        rotated = true;
        const zeta = (beta - alpha) / (2 * gamma);
        const t = (zeta >= 0 ? 1 : -1) / (Math.abs(zeta) + Math.sqrt(1 + zeta * zeta));
        const c = 1 / Math.sqrt(1 + t * t);
        const s = c * t;
        rotate(xi, xj, c, s);
        rotate(vcols[i], vcols[j], c, s);
      }
    }
    if (!rotated) break;
  }
  const order = cols.map((c, j) => ({ j, norm: euclidean(c) })).sort((a, b) => b.norm - a.norm);
  const s = Float64Array.from(order, (o) => o.norm);
  const tol = (s[0] ?? 0) * Math.max(m, n) * eps;
  const uCols: (Float64Array | undefined)[] = order.map(({ j, norm }) => (norm > tol && norm > 0 ? cols[j].map((v) => v / norm) : undefined));
  completeOrthonormal(uCols, m);
  const u = zeros(m, n);
  const v = zeros(n, n);
  for (let k = 0; k < n; k++) {
    for (let i = 0; i < m; i++) u.data[i * n + k] = uCols[k]![i];
    const vc = vcols[order[k].j];
    for (let i = 0; i < n; i++) v.data[i * n + k] = vc[i];
  }
  return { u, s, v };
}

function euclidean(x: Float64Array): number {
  let sum = 0;
  for (let i = 0; i < x.length; i++) sum += x[i] * x[i];
  return Math.sqrt(sum);
}

function rotate(xi: Float64Array, xj: Float64Array, c: number, s: number): void {
  for (let k = 0; k < xi.length; k++) {
    const a = xi[k];
    const b = xj[k];
    xi[k] = c * a - s * b;
    xj[k] = s * a + c * b;
  }
}

/** Fills the undefined entries with unit vectors orthogonal to all others (Gram–Schmidt twice on e_1, e_2, …). */
function completeOrthonormal(vectors: (Float64Array | undefined)[], dim: number): void {
  let candidate = 0;
  for (let k = 0; k < vectors.length; k++) {
    if (vectors[k] !== undefined) continue;
    for (; candidate < dim; candidate++) {
      const w = new Float64Array(dim);
      w[candidate] = 1;
      for (let pass = 0; pass < 2; pass++) {
        for (const q of vectors) {
          if (!q) continue;
          let dot = 0;
          for (let i = 0; i < dim; i++) dot += q[i] * w[i];
          for (let i = 0; i < dim; i++) w[i] -= dot * q[i];
        }
      }
      const norm = euclidean(w);
      if (norm > 0.5) {
        vectors[k] = w.map((x) => x / norm);
        candidate++;
        break;
      }
    }
  }
}

export interface RandomizedSvdOptions {
  /** Extra columns of the sketch beyond k. @defaultValue 8 */
  oversample?: number;
  /** Subspace (power) iterations, each re-orthogonalised. @defaultValue 10 */
  powerIterations?: number;
  /** Seed of the Gaussian sketch. @defaultValue 42 */
  seed?: number;
}

/**
 * Top-k SVD of X [m,n]: U [m,k], σ [k], V [n,k]. With q = k + oversample ≥ min(m,n) it is the
 * exact Jacobi SVD; otherwise Halko–Martinsson–Tropp's randomized range finder, as
 * torch.svd_lowrank does it:
 *   Ω [n,q] ~ N(0,1),  Q = qr(X·Ω).q,  repeat: Q = qr(X·qr(Xᵀ·Q).q).q
 *   X ≈ Q·(Qᵀ·X),  Qᵀ·X [q,n] = Ũ·Σ·Vᵀ  (exact SVD of the small matrix),  U = Q·Ũ
 */
export function truncatedSvd(x: Matrix, k: number, options: RandomizedSvdOptions = {}): { u: Matrix; s: Float64Array; v: Matrix } {
  const p = Math.min(x.rows, x.cols);
  const rank = Math.min(k, p);
  const q = Math.min(p, rank + (options.oversample ?? 8));
  let full: { u: Matrix; s: Float64Array; v: Matrix };
  if (q >= p) {
    full = svd(x);
  } else {
    const rng = new SeededRandom(options.seed ?? 42);
    const omega = zeros(x.cols, q);
    for (let i = 0; i < omega.data.length; i++) omega.data[i] = rng.normal();
    let basis = qr(matmul(x, omega)).q;
    for (let it = 0; it < (options.powerIterations ?? 10); it++) {
      basis = qr(matmul(x, qr(matmulTN(x, basis)).q)).q;
    }
    const small = svd(matmulTN(basis, x)); // Qᵀ·X [q, n]
    full = { u: matmul(basis, small.u), s: small.s, v: small.v };
  }
  return { u: columns(full.u, 0, rank), s: full.s.slice(0, rank), v: columns(full.v, 0, rank) };
}

export interface TruncatedLowRank {
  /** [out, k] */
  b: Matrix;
  /** [k, in] */
  a: Matrix;
  /** k: the requested rank, or min(out, in, R) when that is smaller */
  rank: number;
  /** Σ_{i≤k} σ_i² / Σ σ_i² of B·A (1 for B·A = 0) */
  keptFraction: number;
  /** Σ σ_i² = ‖B·A‖_F² */
  energy: number;
}

/**
 * Best rank-k approximation (Eckart–Young, in Frobenius norm) of B·A, B [out,R], A [R,in],
 * from the factors alone — never the out×in product:
 *   B = Q_B·R_B,  Aᵀ = Q_A·R_A            (thin QR; Q_B [out,p_B], Q_A [in,p_A])
 *   B·A = Q_B·(R_B·R_Aᵀ)·Q_Aᵀ,  core R_B·R_Aᵀ [p_B,p_A] = U·Σ·Vᵀ
 *   B' = Q_B·U_k·√Σ_k [out,k],  A' = √Σ_k·V_kᵀ·Q_Aᵀ [k,in]
 * σ is split symmetrically so both factors have comparable norms.
 */
export function truncateLowRank(b: Matrix, a: Matrix, k: number): TruncatedLowRank {
  if (b.cols !== a.rows) throw new RangeError(`truncateLowRank: B [${b.rows}, ${b.cols}] and A [${a.rows}, ${a.cols}]`);
  const qb = qr(b);
  const qa = qr(transpose(a));
  const core = svd(matmul(qb.r, transpose(qa.r)));
  const rank = Math.min(k, core.s.length);
  const total = core.s.reduce((acc, s) => acc + s * s, 0);
  const kept = core.s.subarray(0, rank).reduce((acc, s) => acc + s * s, 0);
  const root = Array.from(core.s.subarray(0, rank), Math.sqrt);
  const uk = columns(core.u, 0, rank);
  const vk = columns(core.v, 0, rank);
  for (let i = 0; i < uk.rows; i++) for (let j = 0; j < rank; j++) uk.data[i * rank + j] *= root[j];
  for (let i = 0; i < vk.rows; i++) for (let j = 0; j < rank; j++) vk.data[i * rank + j] *= root[j];
  return {
    b: matmul(qb.q, uk),
    a: transpose(matmul(qa.q, vk)),
    rank,
    keptFraction: total === 0 ? 1 : kept / total,
    energy: total,
  };
}

export interface LowRankTerm {
  coef: number;
  /** [out, r_j] */
  b: Matrix;
  /** [r_j, in] */
  a: Matrix;
}

/**
 * ‖Σ_j c_j·B_j·A_j‖_F without the out×in matrix, by the Gram trick:
 *   ‖X‖_F² = tr(XᵀX) = Σ_{j,l} c_j·c_l·tr(A_jᵀ·B_jᵀ·B_l·A_l) = Σ_{j,l} c_j·c_l·tr((B_jᵀ·B_l)·(A_l·A_jᵀ))
 * costing (out + in)·r_j·r_l per pair. Rounding can leave a tiny negative sum when the terms
 * cancel; it is clamped to 0.
 */
export function frobeniusOfSum(terms: LowRankTerm[]): number {
  let total = 0;
  for (let j = 0; j < terms.length; j++) {
    for (let l = j; l < terms.length; l++) {
      const tj = terms[j];
      const tl = terms[l];
      if (tj.coef === 0 || tl.coef === 0) continue;
      const bb = matmulTN(tj.b, tl.b); // B_jᵀ·B_l [r_j, r_l]
      const aa = matmul(tl.a, transpose(tj.a)); // A_l·A_jᵀ [r_l, r_j]
      let trace = 0;
      for (let i = 0; i < bb.rows; i++) for (let p = 0; p < bb.cols; p++) trace += bb.data[i * bb.cols + p] * aa.data[p * aa.cols + i];
      total += (j === l ? 1 : 2) * tj.coef * tl.coef * trace;
    }
  }
  return Math.sqrt(Math.max(0, total));
}
