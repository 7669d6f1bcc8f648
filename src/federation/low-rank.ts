/**
 * Small dense float64 linear algebra for the federated aggregators: products, thin QR,
 * SVD, and operations on low-rank products B·A that never form the out×in matrix.
 *
 * Matrices are row-major: element (i, j) of an m×n matrix is data[i·n + j].
 */

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

/**
 * Xᵀ·Y: [k,m]ᵀ·[k,n] → [m,n], as dot products of contiguous columns (one transpose of each
 * operand); when X and Y are the same matrix only the upper triangle is computed.
 */
export function matmulTN(x: Matrix, y: Matrix): Matrix {
  if (x.rows !== y.rows) throw new RangeError(`matmulTN: [${x.rows}, ${x.cols}]ᵀ·[${y.rows}, ${y.cols}]`);
  const k = x.rows;
  const m = x.cols;
  const n = y.cols;
  const xt = transpose(x).data;
  const yt = x === y ? xt : transpose(y).data;
  const c = new Float64Array(m * n);
  for (let i = 0; i < m; i++) {
    for (let j = x === y ? i : 0; j < n; j++) {
      const v = dot(xt, yt, i * k, j * k, k);
      c[i * n + j] = v;
      if (x === y) c[j * n + i] = v;
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
  const h = householder(x);
  const eye = zeros(h.p, h.p);
  for (let i = 0; i < h.p; i++) eye.data[i * h.p + i] = 1;
  return { q: applyQ(h, eye), r: h.r };
}

/** Householder reduction of X [m,n]: the reflectors and R [p,n]; Q itself is never formed. */
interface Householder {
  m: number;
  p: number;
  /** v_j over rows j…m−1, scaled so that H_j = I − v_j·v_jᵀ */
  vs: Float64Array[];
  r: Matrix;
}

function householder(x: Matrix): Householder {
  const { rows: m, cols: n } = x;
  const p = Math.min(m, n);
  const cols = columnArrays(x); // reduced in place to R; columns contiguous for the inner loops
  const vs: Float64Array[] = [];
  for (let j = 0; j < p; j++) {
    const xj = cols[j];
    const norm2 = dot(xj, xj, j, j, m - j);
    const norm = Math.sqrt(norm2);
    const v = xj.slice(j);
    if (norm === 0) {
      vs.push(v.fill(0)); // zero column: H_j = I
      continue;
    }
    v[0] += v[0] >= 0 ? norm : -norm;
    const scaleV = 1 / Math.sqrt((norm2 - xj[j] * xj[j] + v[0] * v[0]) / 2); // √(2 / vᵀv)
    for (let i = 0; i < v.length; i++) v[i] *= scaleV;
    for (let c = j; c < n; c++) reflect(v, cols[c], j);
    vs.push(v);
  }
  const r = zeros(p, n);
  for (let c = 0; c < n; c++) for (let i = 0; i <= Math.min(c, p - 1); i++) r.data[i * n + c] = cols[c][i];
  return { m, p, vs, r };
}

/** Q·Y for Y [p,k] → [m,k]: H_0·…·H_{p−1}·[Y; 0], right to left (2·m·p·k flops, not m·p² to form Q). */
function applyQ(h: Householder, y: Matrix): Matrix {
  const k = y.cols;
  const cols = Array.from({ length: k }, (_, c) => {
    const col = new Float64Array(h.m);
    for (let i = 0; i < h.p; i++) col[i] = y.data[i * k + c];
    return col;
  });
  for (let j = h.p - 1; j >= 0; j--) for (const col of cols) reflect(h.vs[j], col, j);
  const out = zeros(h.m, k);
  for (let c = 0; c < k; c++) for (let i = 0; i < h.m; i++) out.data[i * k + c] = cols[c][i];
  return out;
}

/** Σ_i x[xOff+i]·y[yOff+i] over len terms, four independent sums (the add latency, not the multiply, bounds a single chain). */
function dot(x: Float64Array, y: Float64Array, xOff: number, yOff: number, len: number): number {
  let s0 = 0;
  let s1 = 0;
  let s2 = 0;
  let s3 = 0;
  let i = 0;
  for (; i + 3 < len; i += 4) {
    s0 += x[xOff + i] * y[yOff + i];
    s1 += x[xOff + i + 1] * y[yOff + i + 1];
    s2 += x[xOff + i + 2] * y[yOff + i + 2];
    s3 += x[xOff + i + 3] * y[yOff + i + 3];
  }
  for (; i < len; i++) s0 += x[xOff + i] * y[yOff + i];
  return s0 + s1 + (s2 + s3);
}

/** y[from:] ← (I − v·vᵀ)·y[from:] */
function reflect(v: Float64Array, y: Float64Array, from: number): void {
  const d = dot(v, y, 0, from, v.length);
  if (d === 0) return;
  for (let i = 0; i < v.length; i++) y[from + i] -= d * v[i];
}

/** The columns of X, each as its own contiguous array. */
function columnArrays(x: Matrix): Float64Array[] {
  const cols = Array.from({ length: x.cols }, () => new Float64Array(x.rows));
  for (let i = 0; i < x.rows; i++) for (let j = 0; j < x.cols; j++) cols[j][i] = x.data[i * x.cols + j];
  return cols;
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
  const sq = new Float64Array(n); // ‖x_j‖², recomputed each sweep, updated after each rotation
  for (let sweep = 0; sweep < 80; sweep++) {
    let rotated = false;
    for (let j = 0; j < n; j++) sq[j] = dot(cols[j], cols[j], 0, 0, m);
    for (let i = 0; i < n - 1; i++) {
      for (let j = i + 1; j < n; j++) {
        const alpha = sq[i];
        const beta = sq[j];
        const gamma = dot(cols[i], cols[j], 0, 0, m);
        if (gamma === 0 || Math.abs(gamma) <= eps * Math.sqrt(alpha * beta)) continue;
        rotated = true;
        const zeta = (beta - alpha) / (2 * gamma);
        const t = (zeta >= 0 ? 1 : -1) / (Math.abs(zeta) + Math.sqrt(1 + zeta * zeta));
        const c = 1 / Math.sqrt(1 + t * t);
        const s = c * t;
        rotate(cols[i], cols[j], c, s);
        rotate(vcols[i], vcols[j], c, s);
        // t solves t²γ + (β − α)t − γ = 0, so ‖x_i′‖² = α − tγ and ‖x_j′‖² = β + tγ
        sq[i] = alpha - t * gamma;
        sq[j] = beta + t * gamma;
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
  const hb = householder(b); // B = Q_B·R_B
  const ha = householder(transpose(a)); // Aᵀ = Q_A·R_A
  const core = svd(matmul(hb.r, transpose(ha.r)));
  const rank = Math.min(k, core.s.length);
  const total = core.s.reduce((acc, s) => acc + s * s, 0);
  const kept = core.s.subarray(0, rank).reduce((acc, s) => acc + s * s, 0);
  const root = Array.from(core.s.subarray(0, rank), Math.sqrt);
  const uk = columns(core.u, 0, rank);
  const vk = columns(core.v, 0, rank);
  for (let i = 0; i < uk.rows; i++) for (let j = 0; j < rank; j++) uk.data[i * rank + j] *= root[j];
  for (let i = 0; i < vk.rows; i++) for (let j = 0; j < rank; j++) vk.data[i * rank + j] *= root[j];
  return {
    b: applyQ(hb, uk), // Q_B·U_k·√Σ_k
    a: transpose(applyQ(ha, vk)), // (Q_A·V_k·√Σ_k)ᵀ
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
 * The Frobenius inner products G_jl = ⟨B_j·A_j, B_l·A_l⟩_F = tr((B_jᵀ·B_l)·(A_l·A_jᵀ)) of
 * low-rank products, from the factors only: (out + in)·r_j·r_l per pair, symmetric.
 */
export function lowRankGram(terms: readonly Pick<LowRankTerm, 'b' | 'a'>[]): Matrix {
  const n = terms.length;
  const g = zeros(n, n);
  if (n === 0) return g;
  // All pairs at once, with long inner loops: Bₛ = [B_1, …, B_n], Aₛ = [A_1; …; A_n],
  // GB = Bₛᵀ·Bₛ and GA = Aₛ·Aₛᵀ [Σr, Σr]; G_jl = Σ_{i ∈ block j, q ∈ block l} GB[i,q]·GA[q,i]
  const bs = hstack(terms.map((t) => t.b));
  const as = vstack(terms.map((t) => t.a));
  const gb = matmulTN(bs, bs);
  const gaT = transpose(as);
  const ga = matmulTN(gaT, gaT);
  const size = bs.cols;
  const offsets = [0];
  for (const t of terms) offsets.push(offsets[offsets.length - 1] + t.b.cols);
  for (let j = 0; j < n; j++) {
    for (let l = j; l < n; l++) {
      let trace = 0;
      for (let i = offsets[j]; i < offsets[j + 1]; i++) for (let q = offsets[l]; q < offsets[l + 1]; q++) trace += gb.data[i * size + q] * ga.data[q * size + i];
      g.data[j * n + l] = trace;
      g.data[l * n + j] = trace;
    }
  }
  return g;
}

/** ‖Σ_j c_j·X_j‖_F from the Gram matrix of the X_j: √(cᵀ·G·c), clamped at 0 against rounding. */
export function normFromGram(gram: Matrix, coefs: readonly number[]): number {
  let total = 0;
  for (let j = 0; j < coefs.length; j++) for (let l = 0; l < coefs.length; l++) total += coefs[j] * coefs[l] * gram.data[j * gram.cols + l];
  return Math.sqrt(Math.max(0, total));
}

/**
 * ‖Σ_j c_j·B_j·A_j‖_F without the out×in matrix, by the Gram trick:
 *   ‖X‖_F² = tr(XᵀX) = Σ_{j,l} c_j·c_l·tr(A_jᵀ·B_jᵀ·B_l·A_l) = Σ_{j,l} c_j·c_l·tr((B_jᵀ·B_l)·(A_l·A_jᵀ))
 * costing (out + in)·r_j·r_l per pair. Rounding can leave a tiny negative sum when the terms
 * cancel; it is clamped to 0.
 */
export function frobeniusOfSum(terms: readonly LowRankTerm[]): number {
  const used = terms.filter((t) => t.coef !== 0);
  return normFromGram(lowRankGram(used), used.map((t) => t.coef));
}
