import { randomBytes } from 'node:crypto';
import { FlowProducer, Queue, Worker, type Job } from 'bullmq';
import { Redis } from 'ioredis';
import { FederationError } from '../errors.js';
import type { ModelConfig } from '../model/architecture/model-config.js';
import type { AdapterFiles, AdapterRecord, PutOptions } from '../pager/adapter-store.js';
import { ClientRegistry, type ClientHeartbeat } from './client-registry.js';
import { selectClients } from './client-selection.js';
import type { FederationObserver } from './federation-observer.js';
import { FederationKeys, roundJobId, trainJobId } from './federation-keys.js';
import { JobStore, type JobRecord, type RoundRecord } from './job-record.js';
import { parseJobSpec, type JobSpec } from './job-spec.js';
import { planPrivacy } from './privacy/privacy-plan.js';
import { applyRoundBudget } from './privacy/round-budget.js';
import { RoundAggregator } from './round-aggregator.js';
import { roundTasks } from './train-task.js';
import { collectUpdates, liveClientStatus } from './update-collector.js';
import { clientBelongsTo } from '../tenants/tenant-ids.js';

/** The narrow part of the gateway federation publishes through: the same store path as PUT. */
export interface AdapterPublisher {
  putAdapter(id: string, files: AdapterFiles, options?: PutOptions): Promise<AdapterRecord>;
  findAdapterVersion(id: string, predicate: (record: AdapterRecord) => boolean): Promise<AdapterRecord | undefined>;
}

export interface CoordinatorOptions {
  redisUrl: string;
  /** Prefix of every key and queue (tests use a unique one). @defaultValue 'lora-gateway' */
  prefix?: string;
  model: ModelConfig;
  /** baseModelFingerprint() of the served model. */
  fingerprint: string;
  maxLoraRank: number;
  publisher: AdapterPublisher;
  observer?: FederationObserver;
  /** Keep accepted updates for GET .../updates/{client} while the job record exists. @defaultValue true */
  keepUpdates?: boolean;
  log?: (line: string) => void;
}

type ControlJob = { kind: 'start'; job: string; round: number; attempt: number } | { kind: 'deadline'; job: string; round: number; attempt: number } | { kind: 'tick'; job: string };

/**
 * Runs federated LoRA jobs on BullMQ. One round attempt is one flow: a parent `aggregate` job
 * in `fed-aggregate` and one `train` child per selected client in that client's own queue, with
 * `ignoreDependencyOnFailure` so a failing client never holds the parent. BullMQ has no child
 * timeout, so a delayed `deadline` job in `fed-control` ends the round at `round_timeout_ms`
 * whatever the stragglers do; whichever of the two comes first aggregates, the other finds the
 * round closed. Job records live in Redis, so a restarted coordinator resumes where it was.
 * Every state change of one job runs under that job's in-process lock (one coordinator per
 * prefix).
 */
export class RoundCoordinator {
  private readonly opts: CoordinatorOptions;
  private readonly redis: Redis;
  private readonly keys: FederationKeys;
  private readonly jobs: JobStore;
  private readonly registry: ClientRegistry;
  private readonly control: Queue;
  private readonly flows: FlowProducer;
  private readonly workers: Worker[] = [];
  private readonly clientQueues = new Map<string, Queue>();
  private readonly locks = new Map<string, Promise<unknown>>();
  private readonly aggregator: RoundAggregator;
  private closed = false;

  private constructor(opts: CoordinatorOptions) {
    this.opts = opts;
    this.redis = new Redis(opts.redisUrl, { maxRetriesPerRequest: null });
    this.keys = new FederationKeys(opts.prefix);
    this.jobs = new JobStore(this.redis, this.keys);
    this.registry = new ClientRegistry(this.redis, this.keys);
    const bull = { connection: this.redis, prefix: this.keys.prefix };
    this.control = new Queue(FederationKeys.controlQueue, bull);
    this.flows = new FlowProducer(bull);
    this.aggregator = new RoundAggregator({ redis: this.redis, keys: this.keys, model: opts.model, maxLoraRank: opts.maxLoraRank, publisher: opts.publisher, keepUpdates: opts.keepUpdates ?? true });
  }

  /** Connects, starts the control and aggregate workers, and resumes every running job. */
  static async start(opts: CoordinatorOptions): Promise<RoundCoordinator> {
    const c = new RoundCoordinator(opts);
    await c.redis.ping();
    const bull = { connection: c.redis, prefix: c.keys.prefix, stalledInterval: 5000, lockDuration: 30_000 };
    c.workers.push(new Worker(FederationKeys.controlQueue, (job: Job<ControlJob>) => c.onControl(job.data), { ...bull, concurrency: 4 }));
    c.workers.push(
      new Worker(FederationKeys.aggregateQueue, (job: Job<{ job: string; round: number; attempt: number }>) => c.finishRound(job.data.job, job.data.round, job.data.attempt), { ...bull, concurrency: 4 }),
    );
    for (const w of c.workers) w.on('error', (err) => c.log(`federation worker error: ${err.message}`));
    await c.resume();
    return c;
  }

  get prefix(): string {
    return this.keys.prefix;
  }

  // ---- the API the HTTP routes use -------------------------------------------------------

  /**
   * `owner.tenant`: a tenant's job, which trains only on that tenant's clients (`<tenant>.<name>`)
   * and is shown only to it; its target_adapter_id is already the store id (`<tenant>~<id>`).
   */
  async submit(input: unknown, owner: { tenant?: string } = {}): Promise<JobRecord> {
    const spec = parseJobSpec(input, this.opts.model, this.opts.maxLoraRank);
    const tenant = owner.tenant;
    const foreign = tenant === undefined ? undefined : spec.clients?.find((c) => !clientBelongsTo(tenant, c));
    if (foreign !== undefined) {
      throw new FederationError('FED_JOB_INVALID', `job spec: clients: '${foreign}' is not one of this tenant's clients (their ids are '${tenant}.<name>')`);
    }
    // a DP job's plan (σ, planned ε) at today's sampling rate; refused when it overspends
    const privacy = spec.dp ? planPrivacy(spec, this.compatibleCount(await this.liveFor(tenant))) : undefined;
    const now = Date.now();
    const rec: JobRecord = {
      id: `fj-${randomBytes(6).toString('hex')}`,
      spec,
      state: 'queued',
      createdAt: now,
      updatedAt: now,
      roundsDone: 0,
      history: [],
      versions: [],
      ...(tenant !== undefined ? { tenant } : {}),
      ...(privacy ? { privacy } : {}),
    };
    // the noise key lives under its own key, never in the record the routes return
    if (privacy) await this.redis.set(this.keys.noiseKey(rec.id), randomBytes(32));
    await this.jobs.save(rec);
    this.log(`federation job ${rec.id}: ${spec.method} → adapter '${spec.target_adapter_id}', ${spec.rounds} round(s)`);
    await this.control.add('start', { kind: 'start', job: rec.id, round: this.firstRound(spec), attempt: 1 }, { jobId: `start.${roundJobId(rec.id, this.firstRound(spec), 1)}` });
    if (spec.schedule) {
      await this.control.upsertJobScheduler(`schedule.${rec.id}`, { every: spec.schedule.every_ms, startDate: now + spec.schedule.every_ms }, { name: 'tick', data: { kind: 'tick', job: rec.id } });
    }
    return rec;
  }

  async list(): Promise<JobRecord[]> {
    return this.jobs.list();
  }

  /** The job record with the running round's live per-client progress merged in. */
  async get(id: string): Promise<JobRecord> {
    const rec = await this.jobs.get(id);
    if (!rec) throw new FederationError('FED_JOB_NOT_FOUND', `federation job '${id}' does not exist`);
    if (rec.current?.state === 'training') rec.current.clients = await liveClientStatus((c) => this.clientQueue(c), rec, rec.current);
    return rec;
  }

  async cancel(id: string): Promise<JobRecord> {
    return this.locked(id, async () => {
      const rec = await this.jobs.get(id);
      if (!rec) throw new FederationError('FED_JOB_NOT_FOUND', `federation job '${id}' does not exist`);
      if (rec.state !== 'queued' && rec.state !== 'running') throw new FederationError('FED_JOB_FINISHED', `federation job '${id}' is already ${rec.state}`);
      if (rec.current) {
        await collectUpdates(this.redis, this.keys, (c) => this.clientQueue(c), rec, rec.current).catch(() => []);
        this.opts.observer?.roundFinished('cancelled', (Date.now() - rec.current.startedAt) / 1000);
        this.closeRound(rec, 'cancelled');
      }
      rec.state = 'cancelled';
      await this.jobs.save(rec);
      await this.stopSchedule(rec);
      this.log(`federation job ${id}: cancelled`);
      return rec;
    });
  }

  /** Live clients a job may use: a tenant's job only its tenant's. */
  private async liveFor(tenant: string | undefined): Promise<ClientHeartbeat[]> {
    const live = await this.registry.live();
    return tenant === undefined ? live : live.filter((c) => clientBelongsTo(tenant, c.id));
  }

  /** Live clients whose base model is the server's (the population a DP job samples from). */
  private compatibleCount(live: ClientHeartbeat[]): number {
    return live.filter((c) => c.fingerprint === this.opts.fingerprint).length;
  }

  async clients(): Promise<(ClientHeartbeat & { compatible: boolean })[]> {
    return (await this.registry.live()).map((c) => ({ ...c, compatible: c.fingerprint === this.opts.fingerprint }));
  }

  /** A client's accepted update of a round (kept while the job record exists). */
  async update(id: string, round: number, client: string): Promise<Buffer> {
    await this.get(id);
    const bytes = await this.aggregator.keptUpdate(id, round, client);
    if (!bytes) throw new FederationError('FED_UPDATE_NOT_FOUND', `job '${id}' has no kept update of client '${client}' in round ${round}`);
    return bytes;
  }

  /** The global state round `round` started from (what its clients trained against). */
  async globalState(id: string, round: number): Promise<Buffer> {
    await this.get(id);
    const bytes = await this.redis.getBuffer(this.keys.global(id, round));
    if (!bytes) throw new FederationError('FED_ROUND_NOT_FOUND', `job '${id}' has no global state for round ${round}`);
    return bytes;
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await Promise.all(this.workers.map((w) => w.close()));
    await Promise.allSettled([...this.locks.values()]);
    await Promise.all([this.control.close(), this.flows.close(), ...[...this.clientQueues.values()].map((q) => q.close())]);
    await this.redis.quit().catch(() => undefined);
  }

  // ---- rounds ---------------------------------------------------------------------------

  /** The round a job runs next: 0 (Fed-SB's gradient initialisation) until that is done, then roundsDone + 1. */
  private nextRound(rec: JobRecord): number {
    const initDone = rec.history.some((h) => h.kind === 'init' && h.state === 'initialized');
    return this.firstRound(rec.spec) === 0 && !initDone ? 0 : rec.roundsDone + 1;
  }

  private firstRound(spec: JobSpec): number {
    return spec.method === 'fedsb' && spec.fedsb.init === 'gradient' ? 0 : 1;
  }

  private async onControl(data: ControlJob): Promise<void> {
    if (data.kind === 'start') await this.startRound(data.job, data.round, data.attempt);
    else if (data.kind === 'deadline') await this.finishRound(data.job, data.round, data.attempt);
    else await this.onTick(data.job);
  }

  private async onTick(id: string): Promise<void> {
    await this.locked(id, async () => {
      const rec = await this.jobs.get(id);
      if (!rec || (rec.state !== 'queued' && rec.state !== 'running')) {
        if (rec) await this.stopSchedule(rec);
        return;
      }
      // rounds of one job never overlap: a tick during a round starts the next one when it ends
      if (rec.current) {
        rec.pendingTick = true;
        await this.jobs.save(rec);
        return;
      }
      await this.queueRound(rec.id, this.nextRound(rec), 1);
    });
  }

  private queueRound(id: string, round: number, attempt: number): Promise<unknown> {
    return this.control.add('start', { kind: 'start', job: id, round, attempt }, { jobId: `start.${roundJobId(id, round, attempt)}` });
  }

  /** Selects the clients, writes the round's global state and adds its flow and deadline. */
  private async startRound(id: string, round: number, attempt: number): Promise<void> {
    await this.locked(id, async () => {
      const rec = await this.jobs.get(id);
      if (!rec || (rec.state !== 'queued' && rec.state !== 'running')) return;
      if (rec.current) {
        // already started (a redelivered start): make sure its jobs exist, nothing more
        if (rec.current.round === round && rec.current.attempt === attempt && rec.current.state === 'training') await this.addRoundJobs(rec, rec.current);
        return;
      }
      if (round !== this.nextRound(rec)) return;
      const now = Date.now();
      const live = await this.liveFor(rec.tenant);
      const current: RoundRecord = {
        round,
        attempt,
        kind: round === 0 ? 'init' : 'train',
        state: 'training',
        startedAt: now,
        deadlineAt: now + rec.spec.round_timeout_ms,
        clients: selectClients(rec.spec, live, this.opts.fingerprint, round, attempt),
      };
      const stop = applyRoundBudget(rec, current, this.compatibleCount(live));
      if (stop) {
        // stop before the round that would cross the budget: nothing of it is trained or released
        rec.state = 'stopped';
        rec.stopReason = stop;
        await this.jobs.save(rec);
        await this.stopSchedule(rec);
        this.log(`federation job ${id}: stopped, ${stop.message}`);
        return;
      }
      await this.aggregator.ensureGlobal(rec, round);
      rec.current = current;
      rec.state = 'running';
      await this.jobs.save(rec);
      await this.addRoundJobs(rec, current);
      const selected = current.clients.filter((c) => c.status !== 'dropped').map((c) => c.client);
      this.log(`federation job ${id}: round ${round}${attempt > 1 ? ` (attempt ${attempt})` : ''} started with ${selected.join(', ') || 'no clients'}`);
    });
  }

  /** Idempotent: deterministic job ids make a re-add after a crash find the existing jobs. */
  private async addRoundJobs(rec: JobRecord, round: RoundRecord): Promise<void> {
    const children = roundTasks(rec, round, this.keys, this.opts.fingerprint).map((task) => ({
      name: 'train',
      queueName: FederationKeys.clientQueue(task.client),
      data: task,
      opts: { jobId: trainJobId(rec.id, round.round, round.attempt, task.client), ignoreDependencyOnFailure: true, attempts: 1, removeOnComplete: false, removeOnFail: false },
    }));
    const parent = { job: rec.id, round: round.round, attempt: round.attempt };
    await this.flows.add({ name: 'aggregate', queueName: FederationKeys.aggregateQueue, data: parent, opts: { jobId: roundJobId(rec.id, round.round, round.attempt) }, children });
    const delay = Math.max(0, round.deadlineAt - Date.now());
    await this.control.add('deadline', { kind: 'deadline', ...parent }, { jobId: `deadline.${roundJobId(rec.id, round.round, round.attempt)}`, delay });
  }

  /**
   * Ends a round attempt once: at its deadline or when every child finished. Marks it
   * `aggregating` first, so a result arriving later is late; a crash after that mark resumes
   * here, and publishing checks the store's provenance, so a round never publishes twice.
   */
  private async finishRound(id: string, round: number, attempt: number): Promise<void> {
    let next: { round: number; attempt: number } | undefined;
    await this.locked(id, async () => {
      const rec = await this.jobs.get(id);
      const cur = rec?.current;
      if (!rec || !cur || cur.round !== round || cur.attempt !== attempt) return;
      if (cur.state === 'training') {
        cur.state = 'aggregating';
        cur.finishedAt = Date.now();
        await this.jobs.save(rec);
      } else if (cur.state !== 'aggregating') return;
      const trainingSeconds = ((cur.finishedAt ?? Date.now()) - cur.startedAt) / 1000;
      const verified = await collectUpdates(this.redis, this.keys, (c) => this.clientQueue(c), rec, cur);
      let outcome: 'published' | 'quorum_missed';
      try {
        outcome = await this.aggregator.aggregate(rec, cur, verified, trainingSeconds);
      } catch (err) {
        // not a client's fault (those are rejections): the job cannot go on, say why and stop
        const e = err as Error & { code?: string };
        await this.failJob(rec, e.code?.toLowerCase() ?? 'aggregation_failed', `round ${round}: ${e.message}`);
        await this.jobs.save(rec);
        return;
      }
      for (const entry of cur.clients) {
        if (entry.status === 'uploaded') this.opts.observer?.updateAccepted(entry.bytes ?? 0);
        else if (entry.status === 'rejected') this.opts.observer?.updateRejected(entry.reason?.split(':')[0] ?? 'other');
        else if (entry.status === 'late') this.opts.observer?.updateLate();
      }
      const seconds = (Date.now() - cur.startedAt) / 1000;
      if (outcome === 'quorum_missed') {
        const accepted = cur.clients.filter((c) => c.status === 'uploaded').length;
        const spent = cur.clients.filter((c) => c.status !== 'uploaded');
        if (rec.privacy?.level === 'sample' && spent.length > 0 && spent.every((c) => c.reason?.includes('privacy_budget_exhausted'))) {
          // every client that could not take part refused for its privacy budget: retrying cannot help
          this.closeRound(rec, 'failed');
          rec.state = 'stopped';
          rec.stopReason = { code: 'privacy_budget_exhausted', message: `round ${round}: ${spent.map((c) => c.client).join(', ')} would pass target_epsilon ${rec.privacy.target_epsilon} with another round of DP-SGD` };
          await this.stopSchedule(rec);
          this.log(`federation job ${id}: stopped, ${rec.stopReason.message}`);
        } else if (attempt <= rec.spec.max_round_retries) {
          this.closeRound(rec, 'retried');
          next = { round, attempt: attempt + 1 };
          this.log(`federation job ${id}: round ${round} got ${accepted} of ${rec.spec.min_clients} needed updates; retrying`);
          this.opts.observer?.roundFinished('retried', seconds);
        } else {
          await this.failJob(rec, 'quorum_not_met', `round ${round}: ${accepted} valid updates after ${attempt} attempts, min_clients is ${rec.spec.min_clients}`);
        }
      } else {
        if (cur.kind === 'train') {
          rec.roundsDone = round;
          rec.versions.push(cur.publishedVersion!);
          this.log(
            `federation job ${id}: round ${round} published '${rec.spec.target_adapter_id}' v${cur.publishedVersion} from ${cur.participants?.length} clients, ${cur.examples} examples, mean train loss ${cur.meanTrainLoss?.toFixed(4)}`,
          );
          this.opts.observer?.roundFinished('published', seconds);
          if (cur.timings) for (const [phase, s] of [['training', cur.timings.trainingSeconds], ['aggregation', cur.timings.aggregationSeconds], ['publishing', cur.timings.publishingSeconds]] as const) this.opts.observer?.roundPhase(phase, s);
        } else {
          this.log(`federation job ${id}: Fed-SB initialised from the gradients of ${cur.participants?.length} clients`);
        }
        this.closeRound(rec, cur.state);
        if (rec.roundsDone >= rec.spec.rounds) {
          rec.state = 'completed';
          await this.stopSchedule(rec);
          this.log(`federation job ${id}: completed`);
        } else if (!rec.spec.schedule || rec.pendingTick || cur.kind === 'init') {
          rec.pendingTick = false;
          next = { round: this.nextRound(rec), attempt: 1 };
        }
      }
      await this.jobs.save(rec);
    });
    if (next) await this.queueRound(id, next.round, next.attempt);
  }

  /** Ends the job with an error and the round in progress as failed (the caller saves). */
  private async failJob(rec: JobRecord, code: string, message: string): Promise<void> {
    const started = rec.current?.startedAt;
    this.closeRound(rec, 'failed');
    rec.state = 'failed';
    rec.error = { code, message };
    await this.stopSchedule(rec);
    this.log(`federation job ${rec.id}: failed, ${message}`);
    if (started !== undefined) this.opts.observer?.roundFinished('failed', (Date.now() - started) / 1000);
  }

  private closeRound(rec: JobRecord, state: RoundRecord['state']): void {
    if (!rec.current) return;
    rec.current.state = state;
    rec.current.finishedAt ??= Date.now();
    rec.history.push(rec.current);
    rec.current = undefined;
  }

  /** After a restart: re-add the jobs of rounds in training, finish rounds caught mid-aggregation. */
  private async resume(): Promise<void> {
    for (const rec of await this.jobs.list()) {
      if (rec.state !== 'running' && rec.state !== 'queued') continue;
      if (!rec.current) {
        await this.queueRound(rec.id, this.nextRound(rec), 1);
      } else if (rec.current.state === 'training') {
        await this.addRoundJobs(rec, rec.current);
      } else if (rec.current.state === 'aggregating') {
        this.log(`federation job ${rec.id}: resuming round ${rec.current.round} after a restart`);
        await this.finishRound(rec.id, rec.current.round, rec.current.attempt);
      }
    }
  }

  private async stopSchedule(rec: JobRecord): Promise<void> {
    if (rec.spec.schedule) await this.control.removeJobScheduler(`schedule.${rec.id}`).catch(() => false);
  }

  private clientQueue(client: string): Queue {
    let q = this.clientQueues.get(client);
    if (!q) {
      q = new Queue(FederationKeys.clientQueue(client), { connection: this.redis, prefix: this.keys.prefix });
      this.clientQueues.set(client, q);
    }
    return q;
  }

  private locked<T>(id: string, fn: () => Promise<T>): Promise<T> {
    const prev = this.locks.get(id) ?? Promise.resolve();
    const run = prev.then(fn, fn);
    const settled = run.catch(() => undefined);
    this.locks.set(id, settled);
    void settled.then(() => {
      if (this.locks.get(id) === settled) this.locks.delete(id);
    });
    return run;
  }

  private log(line: string): void {
    this.opts.log?.(line);
  }
}
