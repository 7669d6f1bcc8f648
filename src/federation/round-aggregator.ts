import type { Redis } from 'ioredis';
import { FederationError, UpdateRejectedError } from '../errors.js';
import type { ModelConfig } from '../model/architecture/model-config.js';
import { fedsbGradientInit, fedsbRandomInit } from './aggregators/fedsb-init.js';
import { weightedSum } from './aggregators/client-update.js';
import type { FederationKeys } from './federation-keys.js';
import { decodeGradients } from './gradient-codec.js';
import { aggregateOffThread, type MethodAggregateInput } from './method-aggregate.js';
import { accountClients, accountRound } from './privacy/privacy-plan.js';
import { clientTrainingSeed } from './train-task.js';
import type { JobPrivacy, JobRecord, RoundRecord } from './job-record.js';
import { clientRank, jobModules, type JobSpec } from './job-spec.js';
import type { FactorSet } from './lora-factors.js';
import { initialLoraFactors, loraScale, seededLoraA } from './lora-init.js';
import type { AdapterPublisher } from './round-coordinator.js';
import type { VerifiedBytes } from './update-collector.js';
import { decodeGlobalState, decodeUpdate, encodeGlobalState } from './update-codec.js';

export interface RoundAggregatorOptions {
  redis: Redis;
  keys: FederationKeys;
  model: ModelConfig;
  maxLoraRank: number;
  publisher: AdapterPublisher;
  keepUpdates: boolean;
}

/**
 * The method-specific half of a round: the global state each round starts from, decoding and
 * checking updates, aggregating, and publishing the result as the target adapter's next
 * version. Deterministic in its inputs, so a round resumed after a crash computes the same
 * adapter, and publishing is skipped when a version with this (job, round) already exists.
 */
export class RoundAggregator {
  private readonly o: RoundAggregatorOptions;

  constructor(options: RoundAggregatorOptions) {
    this.o = options;
  }

  /** Writes round `round`'s starting global state if it is not there yet (only round 1 has none). */
  async ensureGlobal(rec: JobRecord, round: number): Promise<void> {
    if (round === 0) return; // Fed-SB's gradient round starts from the base model alone
    const key = this.o.keys.global(rec.id, round);
    if (await this.o.redis.exists(key)) return;
    const spec = rec.spec;
    const modules = jobModules(spec, this.o.model);
    let factors: FactorSet;
    if (spec.method === 'flora') factors = new Map(); // FLoRA stacks on nothing in round 1
    else if (spec.method === 'fedsb') factors = fedsbRandomInit(spec.seed, modules, modules[0].rank);
    else {
      factors = initialLoraFactors(modules, spec.seed);
      // FFA-LoRA's A is derived from the job seed on every client: it never travels
      if (spec.method === 'ffa') for (const m of factors.values()) delete m.a;
    }
    await this.o.redis.set(key, encodeGlobalState({ job: rec.id, round, method: spec.method }, factors));
  }

  private async global(rec: JobRecord, round: number): Promise<FactorSet> {
    const bytes = await this.o.redis.getBuffer(this.o.keys.global(rec.id, round));
    if (!bytes) throw new Error(`global state of job ${rec.id} round ${round} is missing`);
    const { factors } = decodeGlobalState(bytes);
    if (rec.spec.method === 'ffa') for (const m of factors.values()) m.a = seededLoraA(rec.spec.seed, m);
    return factors;
  }

  /**
   * Decodes and checks the verified bytes, aggregates when the quorum is met, publishes, and
   * fills the round record. Returns what happened.
   */
  async aggregate(rec: JobRecord, cur: RoundRecord, verified: VerifiedBytes[], trainingSeconds: number): Promise<'published' | 'quorum_missed'> {
    if (cur.kind === 'init') return this.initialize(rec, cur, verified, trainingSeconds);
    const spec = rec.spec;
    const t0 = Date.now();
    const modules = jobModules(spec, this.o.model);
    const updates = await this.accept(cur, verified, (v) => {
      const rank = clientRank(spec, v.client);
      const { meta, factors } = decodeUpdate(v.bytes, {
        job: rec.id,
        round: cur.round,
        client: v.client,
        method: spec.method,
        modules: spec.method === 'flora' ? jobModules(spec, this.o.model, rank) : modules,
        clientRank: rank,
      });
      if (meta.numExamples !== v.ref.num_examples) throw new UpdateRejectedError('metadata_mismatch', `num_examples ${meta.numExamples} in the file, ${v.ref.num_examples} in the reference`);
      return { client: v.client, numExamples: meta.numExamples, trainLoss: meta.trainLoss, factors, bytes: v.bytes.length, scale: loraScale(spec.lora.alpha, rank, spec.lora.use_rslora) };
    });
    if (updates.length < spec.min_clients) return 'quorum_missed';

    const previous = await this.global(rec, cur.round);
    const lora = { alpha: spec.lora.alpha, useRslora: spec.lora.use_rslora, r: typeof spec.lora.r === 'number' ? spec.lora.r : 0 };
    const { next, served, stats } = await aggregateOffThread({ method: spec.method, lora, maxLoraRank: this.o.maxLoraRank, previous, updates, ...(await this.rules(rec, cur, updates)) });
    const aggregationSeconds = (Date.now() - t0) / 1000;
    const t1 = Date.now();
    const examples = this.recordParticipants(cur, updates);
    Object.assign(cur, stats);
    const privacyAfter = !rec.privacy
      ? undefined
      : rec.privacy.level === 'client'
        ? accountRound(rec.privacy, cur.sampleRate ?? 1)
        : accountClients(rec.privacy, spec, Object.fromEntries(updates.map((u) => [u.client, u.numExamples])));

    // the next round's starting point, then the kept updates, then the version: each step is
    // idempotent, so a crash anywhere in here is repaired by running it again
    await this.o.redis.set(this.o.keys.global(rec.id, cur.round + 1), encodeGlobalState({ job: rec.id, round: cur.round + 1, method: spec.method }, stripFfaA(spec, next)));
    await this.keepParticipants(rec, cur, verified);
    const provenance = {
      job: rec.id,
      round: cur.round,
      attempt: cur.attempt,
      method: spec.method,
      clients: cur.participants!,
      examples,
      weights: Object.fromEntries(updates.map((u) => [u.client, u.numExamples / examples])),
      mean_train_loss: cur.meanTrainLoss,
      ...(stats.aggregationError !== undefined ? { aggregation_error: stats.aggregationError } : {}),
      ...(stats.keptFraction !== undefined ? { kept_fraction: stats.keptFraction } : {}),
      ...(spec.robust ? { robust: spec.robust } : {}),
      ...(privacyAfter ? { privacy: privacyProvenance(privacyAfter, cur) } : {}),
    };
    const existing = await this.o.publisher.findAdapterVersion(spec.target_adapter_id, (r) => r.provenance?.job === rec.id && r.provenance?.round === cur.round);
    const record = existing ?? (await this.o.publisher.putAdapter(spec.target_adapter_id, served, { provenance }));
    cur.publishedVersion = record.version;
    cur.state = 'published';
    // spent once the version exists (a crash before the record is saved re-accounts from the same history)
    if (privacyAfter) rec.privacy = privacyAfter;
    cur.timings = { trainingSeconds, aggregationSeconds, publishingSeconds: (Date.now() - t1) / 1000 };
    return 'published';
  }

  /** The job's robust and DP rules for the aggregation worker (the noise key read from Redis). */
  private async rules(rec: JobRecord, cur: RoundRecord, updates: { client: string }[]): Promise<Pick<MethodAggregateInput, 'robust' | 'dp'>> {
    const spec = rec.spec;
    const robust = spec.robust ? { normBound: spec.robust.norm_bound, rule: spec.robust.rule, beta: spec.robust.beta, f: spec.robust.f, m: spec.robust.m } : undefined;
    // sample level: the clients noised their own updates; the server adds nothing
    if (!rec.privacy || rec.privacy.level === 'sample') return { robust };
    const key = await this.o.redis.getBuffer(this.o.keys.noiseKey(rec.id));
    if (!key || key.length !== 32) throw new FederationError('FED_DP_INVALID', `the noise key of DP job ${rec.id} is missing`);
    const floraSeeds = spec.method === 'flora' ? Object.fromEntries(updates.map((u) => [u.client, clientTrainingSeed(spec.seed, cur.round, cur.attempt, u.client)])) : undefined;
    return {
      robust,
      dp: {
        clipNorm: rec.privacy.clip_norm,
        noiseMultiplier: rec.privacy.noise_multiplier,
        denominator: cur.dpDenominator ?? updates.length,
        noiseKey: new Uint8Array(key),
        label: `${rec.id}/${cur.round}/${cur.attempt}`,
        ...(floraSeeds ? { floraSeeds } : {}),
      },
    };
  }

  /**
   * Fed-SB's gradient initialisation (LoRA-SB): G = Σ p_k G_k over the clients' full-weight
   * gradients, then B = U_r, R = Σ_r, A = V_rᵀ of the truncated SVD of −η·sign(G), with η the
   * job's learning rate (LoRA-SB's lr / (warmup_ratio · steps) has no warmup to divide by here).
   * Writes round 1's global state; publishes nothing (B·R·A of the init is not a trained adapter).
   */
  private async initialize(rec: JobRecord, cur: RoundRecord, verified: VerifiedBytes[], trainingSeconds: number): Promise<'published' | 'quorum_missed'> {
    const t0 = Date.now();
    const modules = jobModules(rec.spec, this.o.model);
    const accepted = await this.accept(cur, verified, async (v) => {
      const { meta, grads } = await decodeGradients(v.bytes, { job: rec.id, round: cur.round, client: v.client, modules });
      return { client: v.client, numExamples: meta.numExamples, trainLoss: meta.trainLoss, grads, bytes: v.bytes.length };
    });
    if (accepted.length < rec.spec.min_clients) return 'quorum_missed';
    const examples = this.recordParticipants(cur, accepted);
    const p = accepted.map((u) => u.numExamples / examples);
    const mean = new Map(modules.map((m) => [m.modulePath, weightedSum(accepted.map((u) => u.grads.get(m.modulePath)!), p)]));
    const factors = fedsbGradientInit(mean, modules, modules[0].rank, { stepSize: rec.spec.local.lr, seed: rec.spec.seed });
    await this.o.redis.set(this.o.keys.global(rec.id, 1), encodeGlobalState({ job: rec.id, round: 1, method: 'fedsb' }, factors));
    await this.keepParticipants(rec, cur, verified);
    cur.rank = modules[0].rank;
    cur.state = 'initialized';
    cur.timings = { trainingSeconds, aggregationSeconds: (Date.now() - t0) / 1000, publishingSeconds: 0 };
    return 'published';
  }

  /**
   * Decodes every verified upload: an accepted one marks its client `uploaded`, a rejection
   * records its reason; either way `cur.dropped` ends up listing everyone not aggregated.
   */
  private async accept<T>(cur: RoundRecord, verified: VerifiedBytes[], decode: (v: VerifiedBytes) => T | Promise<T>): Promise<T[]> {
    const accepted: T[] = [];
    for (const v of verified) {
      const entry = cur.clients.find((c) => c.client === v.client)!;
      try {
        accepted.push(await decode(v));
        entry.status = 'uploaded';
        delete entry.reason;
      } catch (err) {
        if (!(err instanceof UpdateRejectedError)) throw err;
        entry.status = 'rejected';
        entry.reason = err.message;
      }
    }
    cur.dropped = cur.clients.filter((c) => c.status !== 'uploaded').map((c) => ({ client: c.client, reason: c.reason ?? c.status }));
    return accepted;
  }

  /** Participants, examples, example-weighted mean train loss and upload bytes of the round; returns the examples. */
  private recordParticipants(cur: RoundRecord, accepted: { client: string; numExamples: number; trainLoss: number; bytes: number }[]): number {
    const examples = accepted.reduce((s, u) => s + u.numExamples, 0);
    cur.participants = accepted.map((u) => u.client);
    cur.examples = examples;
    cur.meanTrainLoss = accepted.reduce((s, u) => s + u.trainLoss * u.numExamples, 0) / examples;
    cur.bytesUploaded = accepted.reduce((s, u) => s + u.bytes, 0);
    return examples;
  }

  /** Keeps the aggregated uploads (after recordParticipants) for the audit route (--federation-keep-updates). */
  private async keepParticipants(rec: JobRecord, cur: RoundRecord, verified: VerifiedBytes[]): Promise<void> {
    if (!this.o.keepUpdates) return;
    for (const v of verified) if (cur.participants?.includes(v.client)) await this.o.redis.set(this.o.keys.kept(rec.id, cur.round, v.client), v.bytes);
  }

  keptUpdate(job: string, round: number, client: string): Promise<Buffer | null> {
    return this.o.redis.getBuffer(this.o.keys.kept(job, round, client));
  }
}

/** What a DP version's manifest records of the privacy spent up to and including it. */
function privacyProvenance(privacy: JobPrivacy, cur: RoundRecord): Record<string, unknown> {
  const common = {
    level: privacy.level,
    epsilon: privacy.epsilon,
    delta: privacy.delta,
    order: privacy.order,
    noise_multiplier: privacy.noise_multiplier,
    clip_norm: privacy.clip_norm,
    accountant: 'RDP of the subsampled Gaussian mechanism (Opacus orders), Balle et al. 2020 conversion',
  };
  if (privacy.level === 'sample') {
    // ε is each data owner's; the version's is the largest of them
    return { ...common, per_client: Object.fromEntries(Object.entries(privacy.clients ?? {}).map(([c, v]) => [c, { epsilon: v.epsilon, steps: v.history.reduce((s, h) => s + h.steps, 0), sample_rate: v.history.at(-1)?.sampleRate }])) };
  }
  return { ...common, sample_rate: cur.sampleRate ?? 1, rounds_accounted: privacy.history.reduce((s, h) => s + h.steps, 0) };
}

/** FFA-LoRA's global state carries only B: every client derives A from the seed. */
function stripFfaA(spec: JobSpec, factors: FactorSet): FactorSet {
  if (spec.method !== 'ffa') return factors;
  return new Map([...factors].map(([k, m]) => [k, { ...m, a: undefined }]));
}
