import { FederationError, UpdateRejectedError } from '../../errors.js';
import { SeededRandom } from '../../model/synthetic/seeded-random.js';
import type { FactorSet, ModuleFactors } from '../lora-factors.js';
import { moduleSeed } from '../lora-init.js';
import { columns, matmul, matmulTN, qr, svd, toFloat32, transpose, zeros, type Matrix } from '../low-rank.js';

/** What an initialiser needs of a module: where it is and its shape (any rank it has is ignored). */
export type ModuleShape = Pick<ModuleFactors, 'modulePath' | 'layer' | 'proj' | 'inFeatures' | 'outFeatures'>;

function pickShape(m: ModuleShape): ModuleShape {
  return { modulePath: m.modulePath, layer: m.layer, proj: m.proj, inFeatures: m.inFeatures, outFeatures: m.outFeatures };
}

/*
 * Fed-SB's initial B, A (frozen for the job) and R (the only trained part), after the LoRA-SB
 * authors. Read in their code:
 *   - RaghavSinghal10/lora-sb train_cr.py: eff_lr = lr / (warmup_ratio · total_training_steps);
 *     named_grads = estimate_and_process_grads_torch_3(model, loader, lr=eff_lr, num_samples=170);
 *     lora_alpha = lora_r ("since lora scales by alpha/r, we need to set alpha to r"), so s = 1.
 *   - RaghavSinghal10/lora-sb utils/gradient_utils.py: the gradient G of the full weight W is
 *     summed over the estimation batches and turned into the approximated first update
 *     processed_grads = −eff_lr · sign(G)  (Adam's first step, −η·sign(g)).
 *   - CERT-Lab/fed-sb (read as its copy putssander/fed-sb) fed_sb/utils/initialization_utils.py
 *     find_and_initialize_grad and fed_sb/utils/svd_utils.py get_svd_grad: torch.svd_lowrank of
 *     that update transposed ([in, out]), q = r, niter = 10 → U Σ Vᵀ; lora_A = Uᵀ, lora_B = V,
 *     latent R = diag(Σ), lora_A and lora_B frozen.
 * In our [out, in] layout that is the truncated SVD of the approximated first update:
 *   ΔW₀ = −η·sign(G) ≈ U_r·Σ_r·V_rᵀ,   B = U_r [out,r],  R = Σ_r [r,r],  A = V_rᵀ [r,in],  s = 1
 * so B·R·A is the best rank-r approximation of ΔW₀ and the adapter starts as if the first
 * full fine-tuning step had been taken in the best rank-r subspace. sign() makes the result
 * independent of whether G is a sum or a mean over examples.
 */

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

/** LoRA-SB's step size η for the approximated first update: lr / (warmup_ratio · total_steps). */
export function loraSbStepSize(lr: number, warmupRatio: number, totalSteps: number): number {
  const eta = lr / (warmupRatio * totalSteps);
  if (!(eta > 0) || !Number.isFinite(eta)) {
    throw new FederationError('FED_JOB_INVALID', `LoRA-SB step size lr / (warmup_ratio · total_steps) = ${lr} / (${warmupRatio} · ${totalSteps}) is not a positive number`);
  }
  return eta;
}

export interface FedsbGradientInitOptions extends RandomizedSvdOptions {
  /** η in ΔW₀ = −η·sign(G); see loraSbStepSize */
  stepSize: number;
}

function checkRank(modules: readonly ModuleShape[], rank: number): void {
  if (!Number.isSafeInteger(rank) || rank <= 0) throw new FederationError('FED_JOB_INVALID', `rank ${rank} is not a positive integer`);
  for (const m of modules) {
    if (rank > Math.min(m.inFeatures, m.outFeatures)) {
      throw new FederationError(
        'FED_RANK_TOO_LARGE',
        `Fed-SB rank ${rank} exceeds min(in, out) = ${Math.min(m.inFeatures, m.outFeatures)} of ${m.modulePath}: B and A could not have orthonormal columns and rows`,
      );
    }
  }
}

/**
 * Fed-SB gradient initialisation (LoRA-SB): `gradients` holds, per module path, the clients'
 * averaged ∂L/∂W [out, in] row-major. Returns B = U_r, R = Σ_r, A = V_rᵀ of the truncated SVD
 * of −η·sign(G) (exact Jacobi SVD when r + oversample ≥ min(out, in), else the randomized
 * range finder torch.svd_lowrank uses, with `powerIterations` passes).
 */
export function fedsbGradientInit(gradients: ReadonlyMap<string, Float32Array>, modules: readonly ModuleShape[], rank: number, options: FedsbGradientInitOptions): FactorSet {
  checkRank(modules, rank);
  if (!(options.stepSize > 0) || !Number.isFinite(options.stepSize)) throw new FederationError('FED_JOB_INVALID', `step size ${options.stepSize} is not a positive number`);
  const out: FactorSet = new Map();
  for (const m of modules) {
    const g = gradients.get(m.modulePath);
    if (!g) throw new UpdateRejectedError('missing_tensor', `no gradient for ${m.modulePath}`);
    if (g.length !== m.outFeatures * m.inFeatures) {
      throw new UpdateRejectedError('shape_mismatch', `gradient of ${m.modulePath} holds ${g.length} values, not [${m.outFeatures}, ${m.inFeatures}]`);
    }
    const update = new Float64Array(g.length); // ΔW₀ = −η·sign(G)
    for (let i = 0; i < g.length; i++) {
      if (!Number.isFinite(g[i])) throw new UpdateRejectedError('not_finite', `gradient of ${m.modulePath} holds ${g[i]} at index ${i}`);
      update[i] = -options.stepSize * Math.sign(g[i]);
    }
    const { u, s, v } = truncatedSvd({ rows: m.outFeatures, cols: m.inFeatures, data: update }, rank, options);
    const r = new Float32Array(rank * rank);
    for (let i = 0; i < rank; i++) r[i * rank + i] = s[i];
    out.set(m.modulePath, { ...pickShape(m), rank, b: toFloat32(u), a: toFloat32(transpose(v)), r });
  }
  return out;
}

/**
 * Fed-SB random initialisation: B [out,r] with orthonormal columns and A [r,in] with
 * orthonormal rows (Q factors of seeded Gaussian matrices), R = 0, so ΔW = B·R·A = 0.
 */
export function fedsbRandomInit(seed: number, modules: readonly ModuleShape[], rank: number): FactorSet {
  checkRank(modules, rank);
  const out: FactorSet = new Map();
  for (const m of modules) {
    const gaussian = (rows: number, purpose: string) => {
      const rng = new SeededRandom(moduleSeed(seed, `${m.modulePath}#${purpose}`));
      const x = zeros(rows, rank);
      for (let i = 0; i < x.data.length; i++) x.data[i] = rng.normal();
      return qr(x).q; // [rows, rank], orthonormal columns
    };
    const b = gaussian(m.outFeatures, 'fedsb_B');
    const aT = gaussian(m.inFeatures, 'fedsb_A');
    out.set(m.modulePath, { ...pickShape(m), rank, b: toFloat32(b), a: toFloat32(transpose(aT)), r: new Float32Array(rank * rank) });
  }
  return out;
}
