import { Counter, Gauge, Histogram, exponentialBuckets, type Registry } from 'prom-client';
import {
  FEDERATION_JOB_STATES,
  ROUND_OUTCOMES,
  ROUND_PHASES,
  UPDATE_REJECT_REASONS,
  rejectReason,
  type FederationJobState,
  type FederationObserver,
  type RoundOutcome,
  type RoundPhase,
} from '../federation/federation-observer.js';

/** Rounds last seconds (tiny test jobs) to hours. */
const ROUND_BUCKETS = [1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200];
const PHASE_BUCKETS = [0.1, 0.5, 1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600];
/** 1 KiB · 4^k up to 1 GiB: a rank-4 update of a tiny model to a rank-64 update of an 8B one. */
const BYTE_BUCKETS = exponentialBuckets(1024, 4, 11);

export type JobCounts = Record<FederationJobState, number>;

/** Point-in-time numbers the gauges read at each scrape (BullMQ counts are async). */
export interface FederationGaugeSources {
  /** Federation jobs by state. */
  jobsByState: () => JobCounts | Promise<JobCounts>;
  /** Clients that have sent a heartbeat recently. */
  liveClients: () => number | Promise<number>;
}

/** A duration or size as prom-client accepts it: finite, not negative. */
function amount(x: number): number | undefined {
  return Number.isFinite(x) ? Math.max(0, x) : undefined;
}

/**
 * Prometheus metrics of federated training, on the gateway's registry (`/metrics` serves them
 * with the serving metrics). Labels are fixed sets: outcome, phase, result, reason, state;
 * never a job or client id.
 */
export class FederationMetrics implements FederationObserver {
  readonly rounds: Counter<'outcome'>;
  readonly roundSeconds: Histogram;
  readonly phaseSeconds: Histogram<'phase'>;
  readonly updates: Counter<'result'>;
  readonly rejected: Counter<'reason'>;
  readonly updateBytes: Histogram;

  constructor(registry: Registry, sources: FederationGaugeSources) {
    const registers = [registry];
    this.rounds = new Counter({ name: 'lora_gateway_federation_rounds_total', help: 'Federated rounds finished, by outcome', labelNames: ['outcome'], registers });
    this.roundSeconds = new Histogram({ name: 'lora_gateway_federation_round_duration_seconds', help: 'Time from the start of a federated round to its outcome', buckets: ROUND_BUCKETS, registers });
    this.phaseSeconds = new Histogram({
      name: 'lora_gateway_federation_round_phase_seconds',
      help: 'Time of each phase of a federated round (training, aggregation, publishing)',
      labelNames: ['phase'],
      buckets: PHASE_BUCKETS,
      registers,
    });
    this.updates = new Counter({ name: 'lora_gateway_federation_updates_total', help: 'Client updates received, by result (accepted, rejected, late)', labelNames: ['result'], registers });
    this.rejected = new Counter({ name: 'lora_gateway_federation_updates_rejected_total', help: 'Client updates rejected, by reason', labelNames: ['reason'], registers });
    this.updateBytes = new Histogram({ name: 'lora_gateway_federation_update_bytes', help: 'Size of accepted client updates', buckets: BYTE_BUCKETS, registers });
    // every series exists from the start, so rate() and the dashboard see zeros rather than gaps
    for (const outcome of ROUND_OUTCOMES) this.rounds.inc({ outcome }, 0);
    for (const phase of ROUND_PHASES) this.phaseSeconds.zero({ phase });
    for (const result of ['accepted', 'rejected', 'late']) this.updates.inc({ result }, 0);
    for (const reason of UPDATE_REJECT_REASONS) this.rejected.inc({ reason }, 0);

    new Gauge({
      name: 'lora_gateway_federation_jobs',
      help: 'Federation jobs by state',
      labelNames: ['state'],
      registers,
      async collect() {
        // a scrape must not fail with the job queue: when the counts cannot be read they are NaN (unknown)
        const counts = await Promise.resolve()
          .then(sources.jobsByState)
          .catch(() => undefined);
        for (const state of FEDERATION_JOB_STATES) this.set({ state }, counts ? (counts[state] ?? 0) : NaN);
      },
    });
    new Gauge({
      name: 'lora_gateway_federation_live_clients',
      help: 'Federation clients with a recent heartbeat',
      registers,
      async collect() {
        const live = await Promise.resolve()
          .then(sources.liveClients)
          .catch(() => NaN);
        this.set(live);
      },
    });
  }

  roundFinished(outcome: RoundOutcome, seconds: number): void {
    this.rounds.inc({ outcome });
    const s = amount(seconds);
    if (s !== undefined) this.roundSeconds.observe(s);
  }

  updateAccepted(bytes: number): void {
    this.updates.inc({ result: 'accepted' });
    const b = amount(bytes);
    if (b !== undefined) this.updateBytes.observe(b);
  }

  updateRejected(reason: string): void {
    this.updates.inc({ result: 'rejected' });
    this.rejected.inc({ reason: rejectReason(reason) });
  }

  updateLate(): void {
    this.updates.inc({ result: 'late' });
  }

  roundPhase(phase: RoundPhase, seconds: number): void {
    const s = amount(seconds);
    if (s !== undefined) this.phaseSeconds.observe({ phase }, s);
  }
}
