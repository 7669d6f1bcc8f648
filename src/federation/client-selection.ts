import { SeededRandom } from '../model/synthetic/seeded-random.js';
import type { ClientHeartbeat } from './client-registry.js';
import type { RoundRecord } from './job-record.js';
import type { JobSpec } from './job-spec.js';

/**
 * The clients of one round attempt. A listed client that is not live yet still gets its task
 * (its queue holds it until the client starts; the deadline bounds the wait). With
 * `clients_per_round`, a seeded Fisher–Yates shuffle of the live clients picks them, so the
 * same job, round and attempt pick the same clients. A live client whose base model differs
 * from the server's is dropped with `base_mismatch`: its LoRA would not fit this base.
 */
export function selectClients(spec: JobSpec, liveClients: ClientHeartbeat[], fingerprint: string, round: number, attempt: number): RoundRecord['clients'] {
  const live = new Map(liveClients.map((c) => [c.id, c]));
  const mismatch = (id: string) => live.has(id) && live.get(id)!.fingerprint !== fingerprint;
  if (spec.clients) {
    return spec.clients.map((client) => (mismatch(client) ? { client, status: 'dropped', reason: 'base_mismatch' } : { client, status: 'queued' }));
  }
  const candidates = [...live.keys()].filter((c) => !mismatch(c)).sort();
  const rng = new SeededRandom((spec.seed * 1_000_003 + round * 7919 + attempt) >>> 0);
  for (let i = candidates.length - 1; i > 0; i--) {
    const j = rng.int(i + 1);
    [candidates[i], candidates[j]] = [candidates[j], candidates[i]];
  }
  const picked = candidates.slice(0, spec.clients_per_round).sort();
  const dropped = [...live.keys()].filter(mismatch).map((client) => ({ client, status: 'dropped' as const, reason: 'base_mismatch' }));
  return [...picked.map((client) => ({ client, status: 'queued' as const })), ...dropped];
}
