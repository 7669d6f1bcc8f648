/**
 * What the round coordinator reports as federation runs, for metrics (src/api/federation-metrics.ts)
 * or anything else that wants to watch. Calls carry no job or client ids: observers aggregate.
 */

/** How a round ended: published a new adapter version, will run again, gave up, or was stopped. */
export type RoundOutcome = 'published' | 'retried' | 'failed' | 'cancelled';
export const ROUND_OUTCOMES: readonly RoundOutcome[] = ['published', 'retried', 'failed', 'cancelled'];

/** The timed parts of a round. */
export type RoundPhase = 'training' | 'aggregation' | 'publishing';
export const ROUND_PHASES: readonly RoundPhase[] = ['training', 'aggregation', 'publishing'];

/** A federation job's state, as the jobs-by-state gauge counts them. */
export type FederationJobState = 'queued' | 'running' | 'completed' | 'stopped' | 'failed' | 'cancelled';
export const FEDERATION_JOB_STATES: readonly FederationJobState[] = ['queued', 'running', 'completed', 'stopped', 'failed', 'cancelled'];

/**
 * Why a client's update was rejected: the reasons UpdateRejectedError carries (src/errors.ts),
 * plus 'other' for anything else. Observers map a reason outside this list to 'other', so the
 * set of label values stays fixed.
 */
export const UPDATE_REJECT_REASONS = [
  'hash_mismatch',
  'not_safetensors',
  'metadata_mismatch',
  'unexpected_tensor',
  'missing_tensor',
  'shape_mismatch',
  'not_finite',
  'num_examples_invalid',
  'too_large',
  'missing',
  'other',
] as const;
export type UpdateRejectReason = (typeof UPDATE_REJECT_REASONS)[number];

/** `reason` if it is one of UPDATE_REJECT_REASONS, else 'other'. */
export function rejectReason(reason: string): UpdateRejectReason {
  return (UPDATE_REJECT_REASONS as readonly string[]).includes(reason) ? (reason as UpdateRejectReason) : 'other';
}

export interface FederationObserver {
  /** A round ended after `seconds` (from its start to its outcome). */
  roundFinished(outcome: RoundOutcome, seconds: number): void;
  /** A client's update of `bytes` bytes passed validation and goes into aggregation. */
  updateAccepted(bytes: number): void;
  /** A client's update was refused; `reason` is one of UPDATE_REJECT_REASONS (others count as 'other'). */
  updateRejected(reason: string): void;
  /** A client's update arrived after its round had closed. */
  updateLate(): void;
  /** One phase of a round took `seconds`. */
  roundPhase(phase: RoundPhase, seconds: number): void;
}

/** An observer that records nothing (federation without metrics, tests). */
export const NO_FEDERATION_OBSERVER: FederationObserver = {
  roundFinished() {},
  updateAccepted() {},
  updateRejected() {},
  updateLate() {},
  roundPhase() {},
};
