import assert from 'node:assert/strict';
import { test } from 'node:test';
import type { ClientHeartbeat } from '../../src/federation/client-registry.js';
import { selectClients } from '../../src/federation/client-selection.js';
import { parseJobSpec } from '../../src/federation/job-spec.js';
import { parseModelConfig } from '../../src/model/architecture/model-config.js';
import { TINY_CONFIGS } from '../helpers/tiny-models.js';

const model = parseModelConfig(TINY_CONFIGS.gqa);
const live = (ids: string[], fp = 'base'): ClientHeartbeat[] => ids.map((id) => ({ id, fingerprint: fp, lastSeen: 0, busy: false }));

test('clients_per_round samples live clients with the seed: same job, round and attempt pick the same; others differ; a different base is dropped', () => {
  const spec = parseJobSpec({ target_adapter_id: 'x', method: 'ffa', clients_per_round: 3, seed: 5 }, model, 64);
  const pool = [...live(['a', 'b', 'c', 'd', 'e', 'f', 'g', 'h']), ...live(['other'], 'different')];
  const r1 = selectClients(spec, pool, 'base', 1, 1);
  assert.deepEqual(r1, selectClients(spec, pool, 'base', 1, 1));
  const picked = r1.filter((c) => c.status === 'queued').map((c) => c.client);
  assert.equal(picked.length, 3);
  assert.ok(picked.every((c) => c !== 'other'));
  assert.deepEqual(r1.find((c) => c.client === 'other'), { client: 'other', status: 'dropped', reason: 'base_mismatch' });
  const picks = new Set(Array.from({ length: 6 }, (_, round) => selectClients(spec, pool, 'base', round + 1, 1).filter((c) => c.status === 'queued').map((c) => c.client).join(',')));
  assert.ok(picks.size > 1, 'rounds sample different clients');
});

test('an explicit client list keeps clients that are not live (their queue holds the task) and drops a live one with another base', () => {
  const spec = parseJobSpec({ target_adapter_id: 'x', method: 'ffa', clients: ['a', 'b', 'c'], min_clients: 2 }, model, 64);
  assert.deepEqual(selectClients(spec, [...live(['a']), ...live(['b'], 'different')], 'base', 1, 1), [
    { client: 'a', status: 'queued' },
    { client: 'b', status: 'dropped', reason: 'base_mismatch' },
    { client: 'c', status: 'queued' },
  ]);
});
