import { createHash } from 'node:crypto';
import { hostname } from 'node:os';
import { UnrecoverableError, Worker, type Job } from 'bullmq';
import { Redis } from 'ioredis';
import { FederationError } from '../errors.js';
import type { LlamaModel } from '../model/forward/llama-model.js';
import { loadLlamaModel } from '../model/forward/model-loader.js';
import { TextTokenizer } from '../model/tokenizer/tokenizer.js';
import { baseModelFingerprint } from './base-fingerprint.js';
import { ClientRegistry, type ClientHeartbeat } from './client-registry.js';
import { FederationKeys } from './federation-keys.js';
import { CLIENT_ID_RE } from './job-spec.js';
import { encodeGradients } from './gradient-codec.js';
import { dpSgdRound, fullWeightGradients, meanLoss, trainLocal } from './local-trainer.js';
import { moduleSpecsFor, seededLoraA } from './lora-init.js';
import { epsilonOf } from './privacy/rdp-accountant.js';
import type { FactorSet, ModuleFactors } from './lora-factors.js';
import type { TrainTask, UpdateRef } from './train-task.js';
import { readClientTexts, seededPermutation, tokenWindows } from './training-data.js';
import { decodeGlobalState, encodeUpdate } from './update-codec.js';

export interface ClientWorkerOptions {
  redisUrl: string;
  prefix?: string;
  clientId: string;
  modelDir: string;
  /** The client's own text: a .txt file, a folder of .txt / .jsonl files, or a .jsonl file with a `text` field. */
  dataPath: string;
  /** @defaultValue 2000 */
  heartbeatMs?: number;
  log?: (line: string) => void;
  /** Each local training step, for a progress bar. */
  onStep?: (task: TrainTask, step: number, steps: number, loss: number) => void;
  /** A task ended (trained and uploaded, or failed). */
  onTaskEnd?: (task: TrainTask, outcome: { ref?: UpdateRef; error?: string }) => void;
  /**
   * Test mode for robust aggregation: upload a corrupted update, its change from the round's
   * global multiplied by `scale` (100: a scaled attack, −1: a sign flip). Never for real use.
   */
  poison?: { scale: number };
}

/** Progress is written to the BullMQ job at most this often (each write is a Redis round trip). */
const PROGRESS_EVERY_MS = 200;

/**
 * One federation client: its own process, holding its own text. It announces itself by
 * heartbeat (with its base model's fingerprint), takes `train` tasks from its own queue
 * `fed-client-<id>`, trains locally, writes the update's safetensors bytes under the task's
 * update key with a TTL, and returns only a small reference. The text never leaves the process.
 */
export class FedClientWorker {
  readonly id: string;
  readonly fingerprint: string;
  private readonly opts: ClientWorkerOptions;
  private readonly redis: Redis;
  private readonly registry: ClientRegistry;
  private readonly model: LlamaModel;
  private readonly tokenizer: TextTokenizer;
  private readonly texts: string[];
  private readonly windowsBySeqLen = new Map<number, Int32Array[]>();
  private worker: Worker | undefined;
  private timer: NodeJS.Timeout | undefined;
  private current: TrainTask | undefined;

  private constructor(opts: ClientWorkerOptions, model: LlamaModel, tokenizer: TextTokenizer, texts: string[], fingerprint: string) {
    this.opts = opts;
    this.id = opts.clientId;
    this.model = model;
    this.tokenizer = tokenizer;
    this.texts = texts;
    this.fingerprint = fingerprint;
    this.redis = new Redis(opts.redisUrl, { maxRetriesPerRequest: null });
    this.registry = new ClientRegistry(this.redis, new FederationKeys(opts.prefix));
  }

  static async start(opts: ClientWorkerOptions): Promise<FedClientWorker> {
    if (!CLIENT_ID_RE.test(opts.clientId)) throw new FederationError('FED_JOB_INVALID', `client id '${opts.clientId}' is invalid: use 1–64 letters, digits, '.', '_' or '-'`);
    const texts = await readClientTexts(opts.dataPath);
    const [model, tokenizer, fingerprint] = await Promise.all([loadLlamaModel(opts.modelDir), TextTokenizer.load(opts.modelDir), baseModelFingerprint(opts.modelDir)]);
    const w = new FedClientWorker(opts, model, tokenizer, texts, fingerprint);
    await w.redis.ping();
    await w.beat();
    const interval = opts.heartbeatMs ?? 2000;
    w.timer = setInterval(() => void w.beat().catch((err: Error) => w.log(`heartbeat failed: ${err.message}`)), interval);
    const keys = new FederationKeys(opts.prefix);
    w.worker = new Worker(FederationKeys.clientQueue(w.id), (job: Job<TrainTask>) => w.run(job), {
      connection: w.redis,
      prefix: keys.prefix,
      concurrency: 1,
      lockDuration: 60_000,
    });
    w.worker.on('error', (err) => w.log(`worker error: ${err.message}`));
    w.log(`federation client '${w.id}' ready: ${texts.length} document(s) from ${opts.dataPath}, base ${fingerprint.slice(0, 12)}`);
    return w;
  }

  private async beat(): Promise<void> {
    const hb: ClientHeartbeat = {
      id: this.id,
      fingerprint: this.fingerprint,
      lastSeen: Date.now(),
      busy: this.current !== undefined,
      ...(this.current ? { current: { job: this.current.job, round: this.current.round } } : {}),
      host: hostname(),
      pid: process.pid,
    };
    await this.registry.beat(hb, this.opts.heartbeatMs ?? 2000);
  }

  private windows(seqLen: number): Int32Array[] {
    let w = this.windowsBySeqLen.get(seqLen);
    if (!w) {
      w = tokenWindows(this.tokenizer, this.texts, seqLen);
      this.windowsBySeqLen.set(seqLen, w);
    }
    return w;
  }

  private async run(job: Job<TrainTask>): Promise<UpdateRef> {
    const task = job.data;
    if (task.client !== this.id) throw new UnrecoverableError(`metadata_mismatch: task for client '${task.client}' reached '${this.id}'`);
    if (task.fingerprint !== this.fingerprint) {
      throw new UnrecoverableError(`base_mismatch: this client's base model (${this.fingerprint.slice(0, 12)}) differs from the server's (${task.fingerprint.slice(0, 12)})`);
    }
    this.current = task;
    void this.beat().catch(() => undefined);
    const started = Date.now();
    try {
      const windows = this.windows(task.local.seqLen);
      const modules = moduleSpecsFor(this.model.config, { r: task.lora.rank, alpha: task.lora.alpha, targetModules: task.lora.targetModules, useRslora: task.lora.useRslora });
      const { bytes, numExamples, trainLoss } = task.kind === 'gradient' ? await this.gradients(task, windows, modules) : await this.train(job, task, windows, modules);
      await this.redis.set(task.updateKey, bytes, 'PX', task.updateTtlMs);
      const ref: UpdateRef = {
        key: task.updateKey,
        sha256: createHash('sha256').update(bytes).digest('hex'),
        bytes: bytes.length,
        num_examples: numExamples,
        train_loss: trainLoss,
        train_seconds: (Date.now() - started) / 1000,
      };
      this.opts.onTaskEnd?.(task, { ref });
      return ref;
    } catch (err) {
      this.opts.onTaskEnd?.(task, { error: (err as Error).message });
      if (err instanceof FederationError) throw new UnrecoverableError(`${err.code.toLowerCase()}: ${err.message}`);
      throw err;
    } finally {
      this.current = undefined;
      void this.beat().catch(() => undefined);
    }
  }

  /** Local LoRA training from the round's global state; the update holds only what the method trains. */
  private async train(job: Job<TrainTask>, task: TrainTask, windows: Int32Array[], modules: ModuleFactors[]): Promise<{ bytes: Buffer; numExamples: number; trainLoss: number }> {
    if (task.dp) this.checkBudget(task, windows.length);
    const global = await this.global(task);
    let lastProgress = 0;
    const result = await trainLocal(this.model, windows, {
      ...(task.dp ? { dp: { clipNorm: task.dp.clipNorm, noiseMultiplier: task.dp.noiseMultiplier } } : {}),
      method: task.method,
      modules,
      global,
      alpha: task.lora.alpha,
      useRslora: task.lora.useRslora,
      localRank: task.lora.rank,
      seed: task.seed,
      steps: task.local.steps,
      epochs: task.local.epochs,
      batchSize: task.local.batchSize,
      lr: task.local.lr,
      onStep: async (step, steps, loss) => {
        this.opts.onStep?.(task, step, steps, loss);
        const now = Date.now();
        if (step === steps || now - lastProgress >= PROGRESS_EVERY_MS) {
          lastProgress = now;
          await job.updateProgress({ step, steps, loss });
        } else {
          // let BullMQ renew the job's lock and the heartbeat fire between steps
          await new Promise((r) => setImmediate(r));
        }
      },
    });
    const meta = { job: task.job, round: task.round, client: task.client, method: task.method, numExamples: result.numExamples, trainLoss: result.trainLoss };
    const factors = this.opts.poison ? poisoned(result.factors, global, task.method, this.opts.poison.scale) : result.factors;
    return { bytes: encodeUpdate(meta, factors), numExamples: result.numExamples, trainLoss: result.trainLoss };
  }

  /** Fed-SB's initialisation round: the mean gradient of the loss w.r.t. each target module's full weight. */
  private async gradients(task: TrainTask, windows: Int32Array[], modules: ModuleFactors[]): Promise<{ bytes: Buffer; numExamples: number; trainLoss: number }> {
    // as much data as one round of local training sees (LoRA-SB estimates from a fixed sample
    // too): with `steps`, steps·batch_size windows drawn with the seed; with epochs, all of them
    const cap = task.local.steps !== undefined ? task.local.steps * task.local.batchSize : windows.length;
    const sample = cap >= windows.length ? windows : seededPermutation(windows.length, task.seed).slice(0, cap).map((i) => windows[i]);
    const grads = await fullWeightGradients(this.model, sample, modules, task.local.batchSize);
    const trainLoss = await meanLoss(this.model, sample, null, task.local.batchSize);
    const meta = { job: task.job, round: task.round, client: task.client, numExamples: sample.length, trainLoss };
    return { bytes: encodeGradients(meta, grads, modules), numExamples: sample.length, trainLoss };
  }

  /**
   * Sample-level DP: the data owner's own check that this round's DP-SGD (q = batch / n, the
   * trainer's step count) keeps its ε within the job's target; refuses the task otherwise.
   */
  private checkBudget(task: TrainTask, n: number): void {
    const dp = task.dp!;
    if (dp.targetEpsilon === undefined) return;
    const { sampleRate, steps } = dpSgdRound(task.local, n);
    const { epsilon } = epsilonOf([...dp.prior, { noiseMultiplier: dp.noiseMultiplier, sampleRate, steps }], dp.delta);
    if (epsilon > dp.targetEpsilon) {
      throw new UnrecoverableError(`privacy_budget_exhausted: this round (${steps} DP-SGD steps at q = ${sampleRate.toPrecision(4)}) would take client '${task.client}' to ε = ${epsilon.toPrecision(6)}, past target_epsilon ${dp.targetEpsilon}`);
    }
  }

  /** The round's starting point; FFA-LoRA's frozen A is derived here from the job seed, never sent. */
  private async global(task: TrainTask): Promise<FactorSet> {
    const bytes = await this.redis.getBuffer(task.globalKey);
    if (!bytes) throw new UnrecoverableError(`global_missing: no global state at '${task.globalKey}'`);
    const { factors } = decodeGlobalState(bytes);
    if (task.method === 'ffa') for (const m of factors.values()) m.a = seededLoraA(task.jobSeed, m);
    return factors;
  }

  async close(): Promise<void> {
    if (this.timer) clearInterval(this.timer);
    await this.worker?.close();
    await this.registry.remove(this.id).catch(() => undefined);
    await this.redis.quit().catch(() => undefined);
    this.model.dispose();
  }

  private log(line: string): void {
    this.opts.log?.(line);
  }
}

/**
 * The `--poison scale:K` test mode: every trained factor moved K times as far from the round's
 * global as training moved it (flora: B, whose global start is 0, times K).
 */
function poisoned(factors: FactorSet, global: FactorSet, method: TrainTask['method'], k: number): FactorSet {
  const out: FactorSet = new Map();
  for (const [path, m] of factors) {
    const g = global.get(path);
    const move = (x: Float32Array | undefined, from: Float32Array | undefined) => x && Float32Array.from(x, (v, i) => (from ? from[i] : 0) + k * (v - (from ? from[i] : 0)));
    if (method === 'flora') out.set(path, { ...m, b: move(m.b, undefined) });
    else out.set(path, { ...m, a: method === 'fedavg' ? move(m.a, g?.a) : m.a, b: move(m.b, g?.b), r: move(m.r, g?.r) });
  }
  return out;
}
