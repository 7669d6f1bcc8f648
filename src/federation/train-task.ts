import type { FederationKeys } from './federation-keys.js';
import type { JobRecord, RoundRecord } from './job-record.js';
import { clientRank } from './job-spec.js';
import { fnv1a } from './lora-init.js';
import type { FedMethod } from './lora-factors.js';
import type { MechanismSteps } from './privacy/rdp-accountant.js';

/**
 * What the coordinator asks of one client for one round attempt: the data of its BullMQ
 * `train` job in queue `fed-client-<client>`. Everything the client needs is here or in the
 * global-state key; the client's text never leaves it, only the update it writes to
 * `updateKey` does.
 */
export interface TrainTask {
  job: string;
  round: number;
  attempt: number;
  client: string;
  /** 'train' = local LoRA training; 'gradient' = Fed-SB's initialisation (full-weight gradients). */
  kind: 'train' | 'gradient';
  method: FedMethod;
  /** The server's baseModelFingerprint(); a client with another base refuses the task. */
  fingerprint: string;
  /** Redis key of the global state (safetensors) this round starts from. */
  globalKey: string;
  /** Redis key the client writes its update to, with a TTL of `updateTtlMs`. */
  updateKey: string;
  updateTtlMs: number;
  /** The job's seed: FFA-LoRA's frozen A is derived from it on every client. */
  jobSeed: number;
  /** This client's training seed for this round (batch order, fresh factors). */
  seed: number;
  lora: { rank: number; alpha: number; useRslora: boolean; targetModules: string[] };
  local: { steps?: number; epochs?: number; batchSize: number; lr: number; seqLen: number };
  /**
   * Sample-level DP: train with DP-SGD, and refuse the task if this round would take the
   * client past `targetEpsilon` (its DP-SGD steps in earlier rounds of the job are `prior`).
   */
  dp?: { clipNorm: number; noiseMultiplier: number; delta: number; targetEpsilon?: number; prior: MechanismSteps[] };
}

/** What a client's train job returns: a small reference, never the update itself (BullMQ stores return values as JSON). */
export interface UpdateRef {
  key: string;
  sha256: string;
  bytes: number;
  num_examples: number;
  train_loss: number;
  train_seconds: number;
}

/** Progress a client reports on its train job while it trains. */
export interface TrainProgress {
  step: number;
  steps: number;
  loss: number;
}

/** Updates wait for the coordinator this long in Redis; a day covers any sane round timeout. */
const UPDATE_TTL_MS = 24 * 3600 * 1000;

/** A different seed per client, round and attempt: batch order and fresh factors differ. */
export function clientTrainingSeed(jobSeed: number, round: number, attempt: number, client: string): number {
  return (jobSeed * 31 + round * 1009 + attempt * 17 + fnv1a(client)) >>> 0;
}

/** The task of every selected client of a round attempt (dropped clients get none). */
export function roundTasks(rec: JobRecord, round: RoundRecord, keys: FederationKeys, fingerprint: string): TrainTask[] {
  const spec = rec.spec;
  return round.clients
    .filter((c) => c.status !== 'dropped')
    .map((c) => ({
      job: rec.id,
      round: round.round,
      attempt: round.attempt,
      client: c.client,
      kind: round.kind === 'init' ? 'gradient' : 'train',
      method: spec.method,
      fingerprint,
      globalKey: keys.global(rec.id, round.round),
      updateKey: keys.update(rec.id, round.round, round.attempt, c.client),
      updateTtlMs: UPDATE_TTL_MS,
      jobSeed: spec.seed,
      seed: clientTrainingSeed(spec.seed, round.round, round.attempt, c.client),
      lora: { rank: clientRank(spec, c.client), alpha: spec.lora.alpha, useRslora: spec.lora.use_rslora, targetModules: spec.lora.target_modules },
      local: { steps: spec.local.steps, epochs: spec.local.epochs, batchSize: spec.local.batch_size, lr: spec.local.lr, seqLen: spec.local.seq_len },
      ...(rec.privacy?.level === 'sample'
        ? {
            dp: {
              clipNorm: rec.privacy.clip_norm,
              noiseMultiplier: rec.privacy.noise_multiplier,
              delta: rec.privacy.delta,
              ...(rec.privacy.target_epsilon !== undefined ? { targetEpsilon: rec.privacy.target_epsilon } : {}),
              prior: rec.privacy.clients?.[c.client]?.history ?? [],
            },
          }
        : {}),
    }));
}
