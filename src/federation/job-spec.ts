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
  })
  .strict();

type RawJobSpec = z.infer<typeof jobSpecSchema>;

/** A validated job spec: defaults filled in, the LoRA resolved against the served model. */
export interface JobSpec extends Omit<RawJobSpec, 'method' | 'min_clients' | 'fedsb'> {
  method: FedMethod;
  min_clients: number;
  fedsb: { init: 'gradient' | 'random' };
}

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
  const spec: JobSpec = { ...raw, method, min_clients: minClients, fedsb: { init: raw.fedsb?.init ?? 'gradient' } };
  jobModules(spec, model); // target modules must exist in this model
  return spec;
}

/** The rank a client trains with (flora may give each client its own). */
export function clientRank(spec: JobSpec, client: string): number {
  return typeof spec.lora.r === 'number' ? spec.lora.r : spec.lora.r[client];
}

/** The modules the job adapts, in the model's order, at rank `r` (factor skeletons, no values). */
export function jobModules(spec: JobSpec, model: ModelConfig, r = typeof spec.lora.r === 'number' ? spec.lora.r : 1): ModuleFactors[] {
  return moduleSpecsFor(model, { r, alpha: spec.lora.alpha, targetModules: spec.lora.target_modules, useRslora: spec.lora.use_rslora });
}
