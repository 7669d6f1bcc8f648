import { z } from 'zod';
import { FederationError } from '../errors.js';
import type { ModelConfig } from '../model/architecture/model-config.js';
import { validateAdapterId } from '../pager/adapter-store.js';
import { FED_METHODS, type FedMethod, type ModuleFactors } from './lora-factors.js';
import { moduleSpecsFor } from './lora-init.js';

/** Client ids name BullMQ queues and Redis keys: keep them to a safe alphabet. */
export const CLIENT_ID_RE = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;

const clientId = z.string().regex(CLIENT_ID_RE, 'client ids are 1–64 letters, digits, ".", "_" or "-"');
const rank = z.number().int().positive();

/**
 * A federated training job, as POSTed to /v1/federation/jobs (snake_case, like the OpenAI
 * and vLLM bodies). Defaults follow what a Flower user would expect of one strategy run.
 */
const jobSpecSchema = z
  .object({
    target_adapter_id: z.string(),
    method: z.string(),
    /** Rounds to run; with `schedule`, one round per period until they are done. */
    rounds: z.number().int().positive().max(10_000).default(1),
    schedule: z.object({ every_ms: z.number().int().min(100) }).strict().optional(),
    /** Exactly these clients every round, or `clients_per_round` sampled with the seed from live ones. */
    clients: z.array(clientId).min(1).max(1000).optional(),
    clients_per_round: z.number().int().positive().max(1000).optional(),
    /** Valid updates needed to aggregate a round (quorum). @defaultValue every selected client */
    min_clients: z.number().int().positive().optional(),
    round_timeout_ms: z.number().int().min(100).max(7 * 24 * 3600 * 1000).default(600_000),
    max_round_retries: z.number().int().min(0).max(100).default(2),
    lora: z
      .object({
        /** Rank; for `flora` also a map client id → that client's rank. */
        r: z.union([rank, z.record(clientId, rank)]).default(8),
        alpha: z.number().positive().default(16),
        target_modules: z.array(z.string()).min(1).default(['q_proj', 'v_proj']),
        use_rslora: z.boolean().default(false),
      })
      .strict()
      .default({}),
    local: z
      .object({
        steps: z.number().int().positive().max(1_000_000).optional(),
        epochs: z.number().positive().max(10_000).optional(),
        batch_size: z.number().int().positive().max(4096).default(4),
        lr: z.number().positive().max(10).default(1e-3),
        seq_len: z.number().int().min(2).max(65_536).default(64),
      })
      .strict()
      .default({}),
    seed: z.number().int().min(0).max(2 ** 31 - 1).default(0),
    fedsb: z.object({ init: z.enum(['gradient', 'random']).default('gradient') }).strict().optional(),
    /** Differential privacy (README, "Differential privacy"). */
    dp: z
      .object({
        level: z.enum(['client', 'sample']),
        clip_norm: z.number().positive(),
        /** σ: noise std / clip_norm. Omitted: the smallest σ that meets target_epsilon. */
        noise_multiplier: z.number().min(0).max(1e6).optional(),
        delta: z.number().gt(0).lt(1).default(1e-5),
        target_epsilon: z.number().positive().optional(),
      })
      .strict()
      .optional(),
    /** Robust aggregation: a norm bound on every update and/or one combine rule. */
    robust: z
      .object({
        norm_bound: z.number().positive().optional(),
        rule: z.enum(['trimmed_mean', 'median', 'krum']).optional(),
        /** trimmed_mean: the share cut from each end, 0 ≤ β < 0.5. */
        beta: z.number().min(0).lt(0.5).optional(),
        /** krum: the Byzantine clients tolerated. */
        f: z.number().int().min(0).optional(),
        /** krum: the updates kept (1 = Krum, more = multi-Krum). */
        m: z.number().int().min(1).optional(),
      })
      .strict()
      .optional(),
  })
  .strict();

type RawJobSpec = z.infer<typeof jobSpecSchema>;

/** A validated job spec: defaults filled in, the LoRA resolved against the served model. */
export interface JobSpec extends Omit<RawJobSpec, 'method' | 'min_clients' | 'fedsb'> {
  method: FedMethod;
  min_clients: number;
  fedsb: { init: 'gradient' | 'random' };
}

export type DpSpec = NonNullable<RawJobSpec['dp']>;
export type RobustSpec = NonNullable<RawJobSpec['robust']>;

function fail(code: ConstructorParameters<typeof FederationError>[0], message: string): never {
  throw new FederationError(code, message);
}

/**
 * Validates a job spec against the served model and the rank limit. Each kind of mistake has
 * its own code (unknown method, rank over the maximum, a target module the model lacks,
 * min_clients above the clients, ...) so clients can react without parsing messages.
 */
export function parseJobSpec(input: unknown, model: ModelConfig, maxLoraRank: number): JobSpec {
  const parsed = jobSpecSchema.safeParse(input);
  if (!parsed.success) {
    const issue = parsed.error.issues[0];
    fail('FED_JOB_INVALID', `job spec: ${issue?.path.join('.') || '(root)'}: ${issue?.message}`);
  }
  const raw = parsed.data;
  try {
    validateAdapterId(raw.target_adapter_id);
  } catch (err) {
    fail('FED_JOB_INVALID', `job spec: target_adapter_id: ${(err as Error).message}`);
  }
  if (!(FED_METHODS as readonly string[]).includes(raw.method)) {
    fail('FED_METHOD_UNKNOWN', `job spec: method '${raw.method}' is unknown (one of ${FED_METHODS.join(', ')})`);
  }
  const method = raw.method as FedMethod;
  if ((raw.clients === undefined) === (raw.clients_per_round === undefined)) {
    fail('FED_JOB_INVALID', 'job spec: give exactly one of clients (a list of client ids) or clients_per_round');
  }
  if (raw.clients && new Set(raw.clients).size !== raw.clients.length) fail('FED_JOB_INVALID', 'job spec: clients lists a client twice');
  const selected = raw.clients?.length ?? raw.clients_per_round!;
  const minClients = raw.min_clients ?? selected;
  if (minClients > selected) {
    fail('FED_MIN_CLIENTS_TOO_HIGH', `job spec: min_clients ${minClients} is more than the ${selected} clients selected per round`);
  }
  if (raw.local.steps !== undefined && raw.local.epochs !== undefined) fail('FED_JOB_INVALID', 'job spec: local: give steps or epochs, not both');
  if (raw.local.seq_len > model.maxPositionEmbeddings) {
    fail('FED_JOB_INVALID', `job spec: local.seq_len ${raw.local.seq_len} exceeds the model's context length ${model.maxPositionEmbeddings}`);
  }
  if (raw.fedsb && method !== 'fedsb') fail('FED_JOB_INVALID', `job spec: fedsb options given for method '${method}'`);
  if (typeof raw.lora.r !== 'number') {
    if (method !== 'flora') fail('FED_JOB_INVALID', `job spec: lora.r maps clients to ranks, which only flora allows (method '${method}')`);
    const unmapped = raw.clients?.filter((c) => !(c in (raw.lora.r as Record<string, number>)));
    if (!raw.clients || (unmapped && unmapped.length > 0)) {
      fail('FED_JOB_INVALID', `job spec: lora.r as a map needs an explicit clients list with a rank for each (missing: ${unmapped?.join(', ') ?? 'clients'})`);
    }
  }
  for (const r of typeof raw.lora.r === 'number' ? [raw.lora.r] : Object.values(raw.lora.r)) {
    if (r > maxLoraRank) fail('FED_RANK_TOO_LARGE', `job spec: lora.r ${r} exceeds the configured maximum rank ${maxLoraRank} (--max-lora-rank)`);
  }
  const fedsbInit = raw.fedsb?.init ?? 'gradient';
  if (raw.dp) checkDp(raw.dp, method, fedsbInit, raw.robust);
  if (raw.robust) checkRobust(raw.robust, method, minClients);
  const spec: JobSpec = { ...raw, method, min_clients: minClients, fedsb: { init: fedsbInit } };
  jobModules(spec, model); // target modules must exist in this model
  return spec;
}

function checkDp(dp: DpSpec, method: FedMethod, fedsbInit: string, robust: RobustSpec | undefined): void {
  if (dp.level === 'sample' && dp.noise_multiplier === undefined) {
    // σ from a target needs each client's n (q = batch_size / n), which only the clients know
    fail('FED_DP_INVALID', 'job spec: dp.level "sample" needs noise_multiplier (the sampling rate, batch_size / local examples, differs per client)');
  }
  if (dp.noise_multiplier === undefined && dp.target_epsilon === undefined) {
    fail('FED_DP_INVALID', 'job spec: dp needs noise_multiplier, or target_epsilon to choose it');
  }
  if (method === 'fedsb' && fedsbInit === 'gradient') {
    fail(
      'FED_DP_UNSUPPORTED',
      'job spec: fedsb\'s gradient initialisation uploads every client\'s full-weight gradient without noise, which a DP job cannot allow; give fedsb: { "init": "random" }',
    );
  }
  if (robust?.rule && dp.level === 'client') {
    fail('FED_DP_UNSUPPORTED', `job spec: robust.rule "${robust.rule}" cannot be combined with dp: DP-FedAvg's noise is calibrated to a clipped sum over a fixed number of clients (robust.norm_bound can be)`);
  }
}

function checkRobust(robust: RobustSpec, method: FedMethod, minClients: number): void {
  const rule = robust.rule;
  if (robust.norm_bound === undefined && !rule) fail('FED_JOB_INVALID', 'job spec: robust needs norm_bound and/or rule');
  if ((rule === 'trimmed_mean' || rule === 'median') && method !== 'ffa' && method !== 'fedsb') {
    fail(
      'FED_ROBUST_UNSUPPORTED',
      `job spec: robust.rule "${rule}" is coordinate-wise: it needs every client's factor in one basis (ffa's B, fedsb's R), and ${method}'s factors are not comparable coordinate by coordinate (use krum or norm_bound)`,
    );
  }
  if (robust.beta !== undefined && rule !== 'trimmed_mean') fail('FED_JOB_INVALID', 'job spec: robust.beta belongs to rule "trimmed_mean"');
  if ((robust.f !== undefined || robust.m !== undefined) && rule !== 'krum') fail('FED_JOB_INVALID', 'job spec: robust.f and robust.m belong to rule "krum"');
  if (rule === 'krum') {
    const f = robust.f ?? 1;
    const m = robust.m ?? 1;
    // Krum's guarantee needs n > 2f + 2 updates; every aggregated round has at least min_clients
    if (minClients < 2 * f + 3) fail('FED_ROBUST_UNSUPPORTED', `job spec: krum with f = ${f} needs min_clients ≥ ${2 * f + 3} (n > 2f + 2), got ${minClients}`);
    if (m > minClients - f) fail('FED_ROBUST_UNSUPPORTED', `job spec: krum keeps m = ${m} updates, more than min_clients − f = ${minClients - f}`);
  }
}

/** The rank a client trains with (flora may give each client its own). */
export function clientRank(spec: JobSpec, client: string): number {
  return typeof spec.lora.r === 'number' ? spec.lora.r : spec.lora.r[client];
}

/** The modules the job adapts, in the model's order, at rank `r` (factor skeletons, no values). */
export function jobModules(spec: JobSpec, model: ModelConfig, r = typeof spec.lora.r === 'number' ? spec.lora.r : 1): ModuleFactors[] {
  return moduleSpecsFor(model, { r, alpha: spec.lora.alpha, targetModules: spec.lora.target_modules, useRslora: spec.lora.use_rslora });
}
