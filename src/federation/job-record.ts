import type { Redis } from 'ioredis';
import type { FederationKeys } from './federation-keys.js';
import type { JobSpec } from './job-spec.js';
import type { MechanismSteps } from './privacy/rdp-accountant.js';
import type { RuleStats } from './aggregators/ruled-aggregate.js';

/** `stopped`: ended before its rounds were done because the next round would cross dp.target_epsilon. */
export type JobState = 'queued' | 'running' | 'completed' | 'stopped' | 'failed' | 'cancelled';
export const JOB_STATES: readonly JobState[] = ['queued', 'running', 'completed', 'stopped', 'failed', 'cancelled'];

/**
 * A selected client's part in one round attempt:
 *   queued → training (step i of n, loss) → uploaded (accepted) | rejected (reason) | late | failed (reason);
 *   dropped: never given the round (not live, other base model).
 */
export type ClientRoundStatus = 'queued' | 'training' | 'uploaded' | 'late' | 'rejected' | 'failed' | 'dropped';

export interface ClientRoundEntry {
  client: string;
  status: ClientRoundStatus;
  reason?: string;
  step?: number;
  steps?: number;
  loss?: number;
  numExamples?: number;
  trainLoss?: number;
  bytes?: number;
  /** Seconds the client spent training, as it reported. */
  trainSeconds?: number;
}

export type RoundState = 'training' | 'aggregating' | 'published' | 'retried' | 'failed' | 'cancelled' | 'initialized';

export interface RoundRecord {
  /** 1-based; 0 is Fed-SB's gradient initialisation round. */
  round: number;
  /** 1 + retries of this round after a missed quorum. */
  attempt: number;
  kind: 'train' | 'init';
  state: RoundState;
  startedAt: number;
  deadlineAt: number;
  finishedAt?: number;
  clients: ClientRoundEntry[];
  /** Clients whose updates were aggregated. */
  participants?: string[];
  dropped?: { client: string; reason: string }[];
  examples?: number;
  meanTrainLoss?: number;
  bytesUploaded?: number;
  timings?: { trainingSeconds: number; aggregationSeconds: number; publishingSeconds: number };
  publishedVersion?: number;
  /** fedavg: ‖Σ p_k B_k A_k − B̄Ā‖_F / ‖Σ p_k B_k A_k‖_F. */
  aggregationError?: number;
  /** flora: fraction of ‖ΔW‖²_F kept when the stacked rank was compressed (1 if not). */
  keptFraction?: number;
  /** Rank of the published adapter. */
  rank?: number;
  /** dp jobs: this round's client sampling rate q (clients_per_round / compatible live clients, 1 for a fixed list). */
  sampleRate?: number;
  /** dp jobs: m, the clients sampled this round (DP-FedAvg's fixed denominator). */
  dpDenominator?: number;
  /** Robust / DP bookkeeping: each update's norm, who was bounded, clipped or selected, the noise std. */
  rules?: RuleStats;
  error?: { code: string; message: string };
}

export interface JobRecord {
  id: string;
  spec: JobSpec;
  state: JobState;
  createdAt: number;
  updatedAt: number;
  /** Rounds published so far. */
  roundsDone: number;
  /** The round attempt in progress (absent between rounds). */
  current?: RoundRecord;
  /** Every finished round attempt, oldest first. */
  history: RoundRecord[];
  /** A schedule tick arrived while a round ran: start the next round when it ends. */
  pendingTick?: boolean;
  error?: { code: string; message: string };
  /** Adapter versions this job published, in order. */
  versions: number[];
  /** dp jobs: the privacy plan and what the published rounds spent. */
  privacy?: JobPrivacy;
  /** Why a `stopped` job stopped. */
  stopReason?: { code: string; message: string };
  /** The owning tenant (jobs submitted with a tenant's key); absent for an admin's or an open server's. */
  tenant?: string;
}

/**
 * A DP job's accounting. Client level: one step of the subsampled Gaussian mechanism per
 * published round, q = clients sampled / compatible clients. Sample level: each client's own
 * DP-SGD steps (q_k = batch_size / n_k, local steps per round), ε per client.
 */
export interface JobPrivacy {
  level: 'client' | 'sample';
  noise_multiplier: number;
  clip_norm: number;
  delta: number;
  target_epsilon?: number;
  /** Client level: the sampling rate the plan assumed at submission, and the ε of all planned rounds at it. */
  planned_sample_rate?: number;
  planned_epsilon?: number;
  /** Client level: published rounds as (σ, q, steps) stretches. */
  history: MechanismSteps[];
  /** ε after the published rounds (0 before the first), at δ; sample level: the largest client's. */
  epsilon: number;
  order?: number;
  /** Sample level: each client's DP-SGD steps, its ε, and its examples when it last took part. */
  clients?: Record<string, { history: MechanismSteps[]; epsilon: number; order?: number; examples: number }>;
}

/** Job records as JSON strings in Redis, one key each, listed by a sorted set of creation times. */
export class JobStore {
  private readonly redis: Redis;
  private readonly keys: FederationKeys;

  constructor(redis: Redis, keys: FederationKeys) {
    this.redis = redis;
    this.keys = keys;
  }

  async get(id: string): Promise<JobRecord | undefined> {
    const v = await this.redis.get(this.keys.job(id));
    return v === null ? undefined : (JSON.parse(v) as JobRecord);
  }

  async save(record: JobRecord): Promise<void> {
    record.updatedAt = Date.now();
    await this.redis.multi().set(this.keys.job(record.id), JSON.stringify(record)).zadd(this.keys.jobs(), record.createdAt, record.id).exec();
  }

  async list(): Promise<JobRecord[]> {
    const ids = await this.redis.zrange(this.keys.jobs(), 0, -1);
    if (ids.length === 0) return [];
    const values = await this.redis.mget(ids.map((id) => this.keys.job(id)));
    return values.filter((v): v is string => v !== null).map((v) => JSON.parse(v) as JobRecord);
  }
}
