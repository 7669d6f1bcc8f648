import * as tf from '@tensorflow/tfjs-core';
import { FederationError } from '../errors.js';
import type { ProjectionName } from '../model/architecture/llama-weights.js';
import { forwardSequences, type LlamaModel } from '../model/forward/llama-model.js';
import { LoraAdapter, loraModuleKey, type LoraModuleWeights } from '../model/lora/lora-adapter.js';
import { factorShape, type FactorSet, type FedMethod, type ModuleFactors } from './lora-factors.js';
import { loraScale, seededLoraA } from './lora-init.js';

/**
 * The trainable side of one client's LoRA for one round: which factors are tf.Variables,
 * which are frozen constants, and how they combine into the LoraAdapter the forward pass
 * applies (y += scale · (x · aT) · bT, aT [in, r], bT [r, out]). Per method, in PEFT layout
 * (A [r, in], B [out, r], R [r, r]):
 *   fedavg  ΔW = s·B·A            A, B trained              aT = Aᵀ, bT = Bᵀ, scale s
 *   ffa     ΔW = s·B·A            B trained, A frozen        same
 *   flora   ΔW = B_g·A_g + s_k·B_k·A_k   A_k, B_k trained, global frozen
 *                                 aT = [A_gᵀ | s_k·A_kᵀ], bT = [B_gᵀ ; B_kᵀ], scale 1
 *   fedsb   ΔW = B·R·A            R trained, A, B frozen     aT = Aᵀ·Rᵀ, bT = Bᵀ, scale 1
 * Variables are kept in device layout (Aᵀ, Bᵀ) except R; Adam is element-wise, so the
 * layout changes nothing but the transposes on the way in and out.
 */

/** What decides a round's trainable LoRA. All host arrays are in PEFT layout. */
export interface TrainableSpec {
  method: FedMethod;
  /** The job's adapted modules (moduleSpecsFor), in model order; their rank is the job's r. */
  modules: ModuleFactors[];
  /**
   * The round's starting point: fedavg a+b, ffa a+b (a derived from the job seed), fedsb
   * a+b+r; flora the frozen global adapter (scale folded in, any rank, may be empty).
   */
  global: FactorSet;
  alpha: number;
  useRslora?: boolean;
  /** flora: this client's rank (default: each module's rank). */
  localRank?: number;
  /** flora: the local A is seededLoraA(seed, …). Also the batch shuffle's seed. */
  seed: number;
}

interface TrainableModule {
  skeleton: ModuleFactors;
  /** Frozen tensors this module owns. */
  constants: tf.Tensor[];
  variables: Map<'aT' | 'bT' | 'r', tf.Variable<tf.Rank.R2>>;
  /** The module's effective weights from the current variables (differentiable; inside a tidy). */
  effective: () => LoraModuleWeights;
}

function jobInvalid(message: string): never {
  throw new FederationError('FED_JOB_INVALID', message);
}

/** A host factor [rows, cols] checked against its expected shape, on device. */
function factorTensor(m: ModuleFactors, which: 'A' | 'B' | 'R', data: Float32Array | undefined, what: string): tf.Tensor2D {
  const shape = factorShape(m, which);
  if (!data) jobInvalid(`${m.modulePath}: the ${what} has no lora_${which}`);
  if (data.length !== shape[0] * shape[1]) jobInvalid(`${m.modulePath}: lora_${which} of the ${what} has ${data.length} values, expected [${shape}]`);
  return tf.tensor2d(data, shape, 'float32');
}

const transposed = (t: tf.Tensor2D): tf.Tensor2D => tf.tidy(() => tf.transpose(t));

function skeletonOf(m: ModuleFactors, rank = m.rank): ModuleFactors {
  return { modulePath: m.modulePath, layer: m.layer, proj: m.proj, inFeatures: m.inFeatures, outFeatures: m.outFeatures, rank };
}

export class TrainableLora {
  private readonly modules: TrainableModule[];
  private readonly method: FedMethod;

  private constructor(method: FedMethod, modules: TrainableModule[]) {
    this.method = method;
    this.modules = modules;
  }

  /** Everything the optimizer updates, in module order (aT before bT). */
  get variables(): tf.Variable[] {
    return this.modules.flatMap((m) => [...m.variables.values()]);
  }

  static create(spec: TrainableSpec): TrainableLora {
    const built: TrainableModule[] = [];
    try {
      for (const m of spec.modules) built.push(buildModule(spec, m));
      if (spec.method === 'flora') {
        // modules the global adapter adapts but this client does not train stay applied, frozen
        const trained = new Set(spec.modules.map((m) => m.modulePath));
        for (const g of spec.global.values()) if (!trained.has(g.modulePath)) built.push(frozenFloraGlobal(g));
      }
    } catch (err) {
      for (const m of built) disposeModule(m);
      throw err;
    }
    return new TrainableLora(spec.method, built);
  }

  /** The LoRA the forward pass applies, built from the current variables. Call inside a tidy or gradient tape. */
  adapter(): LoraAdapter {
    const modules = new Map<string, LoraModuleWeights>();
    const targets = new Set<ProjectionName>();
    for (const m of this.modules) {
      modules.set(loraModuleKey(m.skeleton.layer, m.skeleton.proj), m.effective());
      targets.add(m.skeleton.proj);
    }
    return new LoraAdapter(`local-${this.method}`, modules, targets);
  }

  /** The trained factors on the host in PEFT layout: fedavg a+b, ffa b, flora local a+b, fedsb r. */
  async read(): Promise<FactorSet> {
    const out: FactorSet = new Map();
    for (const m of this.modules) {
      if (m.variables.size === 0) continue;
      const f: ModuleFactors = { ...m.skeleton };
      const aT = m.variables.get('aT');
      const bT = m.variables.get('bT');
      const r = m.variables.get('r');
      if (aT) f.a = await hostTransposed(aT);
      if (bT) f.b = await hostTransposed(bT);
      if (r) f.r = (await r.data()) as Float32Array;
      out.set(m.skeleton.modulePath, f);
    }
    return out;
  }

  dispose(): void {
    for (const m of this.modules) disposeModule(m);
  }
}

async function hostTransposed(v: tf.Tensor2D): Promise<Float32Array> {
  const t = transposed(v);
  try {
    return (await t.data()) as Float32Array;
  } finally {
    t.dispose();
  }
}

function disposeModule(m: TrainableModule): void {
  for (const t of m.constants) t.dispose();
  for (const v of m.variables.values()) v.dispose();
}

function buildModule(spec: TrainableSpec, m: ModuleFactors): TrainableModule {
  // every tensor goes into `module` the moment it exists, so a refusal half-way frees them all
  const module: TrainableModule = { skeleton: skeletonOf(m), constants: [], variables: new Map(), effective: () => jobInvalid('unreachable') };
  const constant = (t: tf.Tensor2D): tf.Tensor2D => (module.constants.push(t), t);
  const trainable = (which: 'aT' | 'bT' | 'r', t: tf.Tensor2D): tf.Variable<tf.Rank.R2> => {
    const v = tf.variable(t, true) as tf.Variable<tf.Rank.R2>; // shares t's data (ref-counted), so t can go at once
    t.dispose();
    module.variables.set(which, v);
    return v;
  };
  /** A host factor on device in the layout the forward pass wants: Aᵀ [in, r], Bᵀ [r, out], R as is. */
  const device = (which: 'A' | 'B' | 'R', data: Float32Array | undefined, owner: ModuleFactors = m): tf.Tensor2D => {
    const t = factorTensor(owner, which, data, 'global adapter');
    if (which === 'R') return t;
    const tt = transposed(t);
    t.dispose();
    return tt;
  };
  const g = spec.global.get(m.modulePath);
  try {
    if (spec.method !== 'flora') {
      if (!g) jobInvalid(`${m.modulePath}: the global adapter lacks this module`);
      if (g.rank !== m.rank) jobInvalid(`${m.modulePath}: global rank ${g.rank} differs from the job's rank ${m.rank}`);
    }
    switch (spec.method) {
      case 'fedavg':
      case 'ffa': {
        const scale = loraScale(spec.alpha, m.rank, spec.useRslora);
        const aT = spec.method === 'fedavg' ? trainable('aT', device('A', g!.a)) : constant(device('A', g!.a));
        const bT = trainable('bT', device('B', g!.b));
        module.effective = () => ({ aT, bT, rank: m.rank, scale });
        break;
      }
      case 'fedsb': {
        const aT = constant(device('A', g!.a));
        const bT = constant(device('B', g!.b));
        const r = trainable('r', device('R', g!.r));
        // x·(B·R·A)ᵀ = x·Aᵀ·Rᵀ·Bᵀ: fold Rᵀ into aT
        module.effective = () => ({ aT: tf.matMul(aT, r, false, true), bT, rank: m.rank, scale: 1 });
        break;
      }
      case 'flora': {
        const rank = spec.localRank ?? m.rank;
        if (!Number.isInteger(rank) || rank < 1) jobInvalid(`flora local rank must be a positive integer, got ${rank}`);
        const local = skeletonOf(m, rank);
        module.skeleton = local;
        const sk = loraScale(spec.alpha, rank, spec.useRslora);
        const aTk = trainable('aT', device('A', seededLoraA(spec.seed, local), local));
        const bTk = trainable('bT', tf.zeros([rank, m.outFeatures]) as tf.Tensor2D);
        if (!g || g.rank === 0) {
          module.effective = () => ({ aT: aTk, bT: bTk, rank, scale: sk });
          break;
        }
        if (g.inFeatures !== m.inFeatures || g.outFeatures !== m.outFeatures) {
          jobInvalid(`${m.modulePath}: the global adapter is [${g.outFeatures}, ${g.inFeatures}], the model's module [${m.outFeatures}, ${m.inFeatures}]`);
        }
        const aTg = constant(device('A', g.a, g));
        const bTg = constant(device('B', g.b, g));
        // [A_gᵀ | s_k·A_kᵀ] · [B_gᵀ ; B_kᵀ] = A_gᵀB_gᵀ + s_k·A_kᵀB_kᵀ, i.e. ΔW = B_g·A_g + s_k·B_k·A_k
        module.effective = () => ({
          aT: tf.concat([aTg, tf.mul(aTk, sk) as tf.Tensor2D], 1),
          bT: tf.concat([bTg, bTk], 0),
          rank: g.rank + rank,
          scale: 1,
        });
        break;
      }
      default:
        throw new FederationError('FED_METHOD_UNKNOWN', `unknown federated method '${spec.method as string}'`);
    }
  } catch (err) {
    disposeModule(module);
    throw err;
  }
  return module;
}

/** A global FLoRA module this client does not train: applied as is (scale 1 folded in). */
function frozenFloraGlobal(g: ModuleFactors): TrainableModule {
  const a = factorTensor(g, 'A', g.a, 'global adapter');
  const b = factorTensor(g, 'B', g.b, 'global adapter');
  const aT = transposed(a);
  const bT = transposed(b);
  a.dispose();
  b.dispose();
  return { skeleton: skeletonOf(g), constants: [aT, bT], variables: new Map(), effective: () => ({ aT, bT, rank: g.rank, scale: 1 }) };
}

/**
 * Mean causal-LM cross-entropy over every predicted token of the windows (a window w gives
 * inputs w[0..n-1) and targets w[1..n)), each window one stateless SequenceStep:
 *   L = −(1/N) Σ_t log softmax(logits_t)[target_t],   N = Σ (|w| − 1).
 * The target pick is a product with a one-hot mask: the gather's gradient needs
 * UnsortedSegmentSum, which the wasm backend lacks.
 */
export function windowsLoss(model: LlamaModel, windows: Int32Array[], adapter: LoraAdapter | null): tf.Scalar {
  return tf.tidy(() => {
    const targets: number[] = [];
    const steps = windows.map((w) => {
      for (let i = 1; i < w.length; i++) targets.push(w[i]);
      return { tokens: Array.from(w.subarray(0, w.length - 1)), adapter, logits: 'all' as const };
    });
    const logits = forwardSequences(model, steps);
    const picked = tf.mul(tf.logSoftmax(logits), tf.oneHot(tf.tensor1d(targets, 'int32'), model.config.vocabSize));
    return tf.div(tf.neg(tf.sum(picked)), targets.length) as tf.Scalar;
  });
}

/**
 * A device LoraAdapter from host factors in PEFT layout (for evaluation, e.g. a held-out
 * loss): ΔW = scale·B·A, or scale·B·R·A where a module carries r (aT = Aᵀ·Rᵀ).
 */
export function adapterFromFactors(id: string, factors: Iterable<ModuleFactors>, scale: number): LoraAdapter {
  const modules = new Map<string, LoraModuleWeights>();
  const targets = new Set<ProjectionName>();
  try {
    for (const m of factors) {
      const [aT, bT] = tf.tidy(() => {
        const a = factorTensor(m, 'A', m.a, 'adapter');
        const b = factorTensor(m, 'B', m.b, 'adapter');
        const aT = m.r ? tf.transpose(tf.matMul(factorTensor(m, 'R', m.r, 'adapter'), a)) : tf.transpose(a);
        return [aT, tf.transpose(b)] as tf.Tensor2D[];
      });
      modules.set(loraModuleKey(m.layer, m.proj), { aT, bT, rank: m.rank, scale });
      targets.add(m.proj);
    }
  } catch (err) {
    for (const w of modules.values()) tf.dispose([w.aT, w.bT]);
    throw err;
  }
  return new LoraAdapter(id, modules, targets);
}
