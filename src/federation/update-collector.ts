import { createHash } from 'node:crypto';
import { Job, type Queue } from 'bullmq';
import type { Redis } from 'ioredis';
import { UpdateRejectedError } from '../errors.js';
import { trainJobId, type FederationKeys } from './federation-keys.js';
import type { ClientRoundEntry, JobRecord, RoundRecord } from './job-record.js';
import type { TrainProgress, UpdateRef } from './train-task.js';

/** A client's update that passed every check, with its raw bytes for auditing. */
export interface VerifiedBytes {
  client: string;
  bytes: Buffer;
  ref: UpdateRef;
}

export type QueueOf = (client: string) => Queue;

const MAX_UPDATE_BYTES = 2 ** 31 - 1;

/**
 * Reads what the round's clients returned and sorts them into accepted bytes and entries with
 * a status. A reference is trusted only after its key, size and sha256 check out; the content
 * itself (shapes, finiteness, job/round/client) is checked by the method's decoder next.
 * Children still waiting are removed, so a client that comes back later does not train a
 * round that is over; active ones cannot be removed and are counted late.
 */
export async function collectUpdates(redis: Redis, keys: FederationKeys, queueOf: QueueOf, rec: JobRecord, round: RoundRecord): Promise<VerifiedBytes[]> {
  const accepted: VerifiedBytes[] = [];
  for (const entry of round.clients) {
    if (entry.status === 'dropped') continue;
    const child = await Job.fromId(queueOf(entry.client), trainJobId(rec.id, round.round, round.attempt, entry.client));
    const state = child ? await child.getState() : 'unknown';
    if (!child || state !== 'completed') {
      if (child && state === 'failed') {
        setStatus(entry, 'failed', child.failedReason || 'the client failed the task');
      } else {
        if (child && (state === 'waiting' || state === 'delayed' || state === 'prioritized')) await child.remove().catch(() => undefined);
        setStatus(entry, 'late', 'no update before the round ended');
      }
      continue;
    }
    const ref = child.returnvalue as UpdateRef | null;
    try {
      const bytes = await fetchVerified(redis, keys.update(rec.id, round.round, round.attempt, entry.client), ref);
      accepted.push({ client: entry.client, bytes, ref: ref! });
      entry.numExamples = ref!.num_examples;
      entry.trainLoss = ref!.train_loss;
      entry.bytes = ref!.bytes;
      entry.trainSeconds = ref!.train_seconds;
    } catch (err) {
      if (!(err instanceof UpdateRejectedError)) throw err;
      setStatus(entry, 'rejected', err.reason);
      entry.reason = err.message;
    }
  }
  return accepted;
}

function setStatus(entry: ClientRoundEntry, status: ClientRoundEntry['status'], reason: string): void {
  entry.status = status;
  entry.reason = reason;
}

async function fetchVerified(redis: Redis, expectedKey: string, ref: UpdateRef | null): Promise<Buffer> {
  if (!ref || typeof ref !== 'object' || typeof ref.key !== 'string' || typeof ref.sha256 !== 'string') {
    throw new UpdateRejectedError('metadata_mismatch', 'the train job returned no update reference');
  }
  // the key is fixed per (job, round, attempt, client): a client cannot point at another's update
  if (ref.key !== expectedKey) throw new UpdateRejectedError('metadata_mismatch', `update key '${ref.key}' is not this client's key for this round`);
  if (!Number.isInteger(ref.bytes) || ref.bytes <= 0 || ref.bytes > MAX_UPDATE_BYTES) throw new UpdateRejectedError('too_large', `update size ${ref.bytes} is invalid`);
  const bytes = await redis.getBuffer(expectedKey);
  if (!bytes) throw new UpdateRejectedError('missing', `update key '${expectedKey}' holds nothing (expired or never written)`);
  if (bytes.length !== ref.bytes) throw new UpdateRejectedError('hash_mismatch', `update has ${bytes.length} bytes, the reference says ${ref.bytes}`);
  const sha = createHash('sha256').update(bytes).digest('hex');
  if (sha !== ref.sha256) throw new UpdateRejectedError('hash_mismatch', `update sha256 ${sha} differs from the reference's ${ref.sha256}`);
  return bytes;
}

/** The live view of a round in training: each client's child job state and reported progress. */
export async function liveClientStatus(queueOf: QueueOf, rec: JobRecord, round: RoundRecord): Promise<ClientRoundEntry[]> {
  return Promise.all(
    round.clients.map(async (entry) => {
      if (entry.status !== 'queued') return entry;
      const child = await Job.fromId(queueOf(entry.client), trainJobId(rec.id, round.round, round.attempt, entry.client));
      if (!child) return entry;
      const state = await child.getState();
      const progress = child.progress as Partial<TrainProgress> | number;
      if (state === 'active') {
        const p = typeof progress === 'object' ? progress : {};
        return { ...entry, status: 'training' as const, step: p.step, steps: p.steps, loss: p.loss };
      }
      if (state === 'completed') return { ...entry, status: 'uploaded' as const };
      if (state === 'failed') return { ...entry, status: 'failed' as const, reason: child.failedReason };
      return entry;
    }),
  );
}
