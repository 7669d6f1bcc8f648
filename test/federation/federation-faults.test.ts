import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { Worker, type Job } from 'bullmq';
import { Redis } from 'ioredis';
import { writeDemoModel } from '../../src/cli/demo-model-command.js';
import { readModelConfig } from '../../src/model/architecture/model-config.js';
import { FederationKeys } from '../../src/federation/federation-keys.js';
import { moduleSpecsFor } from '../../src/federation/lora-init.js';
import type { FactorSet } from '../../src/federation/lora-factors.js';
import type { TrainTask, UpdateRef } from '../../src/federation/train-task.js';
import { encodeUpdate } from '../../src/federation/update-codec.js';
import { REDIS_URL, dropPrefix, eventually, startClients, startFederatedServer, uniquePrefix, writeEraText, type CliProcess } from '../helpers/federation-fixture.js';
import { useWasm } from '../helpers/tiny-models.js';

let root: string;
let modelDir: string;
let server: Awaited<ReturnType<typeof startFederatedServer>>;
let clients: CliProcess[] = [];
const prefix = uniquePrefix('faults');
const redis = new Redis(REDIS_URL, { maxRetriesPerRequest: null });
const forgers: Worker[] = [];
const forgerConnections: Redis[] = [];

before(async () => {
  await useWasm();
  root = await mkdtemp(join(tmpdir(), 'lora-gateway-fedfault-'));
  modelDir = join(root, 'model');
  await writeDemoModel(modelDir, { adapters: 0 });
  const a = await writeEraText(join(root, 'data'), 'alpha', 1790, 1850, 3000);
  const b = await writeEraText(join(root, 'data'), 'beta', 1930, 1990, 3000);
  const c = await writeEraText(join(root, 'data'), 'gamma', 1860, 1920, 20_000);
  clients = await startClients(modelDir, REDIS_URL, prefix, [
    ['alpha', a],
    ['beta', b],
    ['gamma', c],
  ]);
  server = await startFederatedServer(modelDir, join(root, 'serve'), REDIS_URL, prefix);
});

after(async () => {
  await server?.close();
  await Promise.all(forgers.map((w) => w.close()));
  // BullMQ leaves a connection it was given open: quit them, or this process never exits
  await Promise.all(forgerConnections.map((c) => c.quit()));
  await dropPrefix(redis, prefix);
  await Promise.all(clients.map((c) => c.stop('SIGKILL')));
  await redis.quit();
  await rm(root, { recursive: true, force: true });
});

const api = <T>(method: string, path: string, body?: unknown) => server.api<T>(method, path, body);

interface RoundJson {
  round: number;
  state: string;
  started_at: number;
  participants: string[];
  clients: { client: string; status: string; reason?: string; step?: number }[];
  dropped: { client: string; reason: string }[];
}
interface JobJson {
  id: string;
  state: string;
  versions: number[];
  current_round: RoundJson | null;
  history: RoundJson[];
}

const waitJob = (id: string, until: (j: JobJson) => boolean, what: string, timeoutMs = 120_000) =>
  eventually(async () => {
    const { json } = await api<JobJson>('GET', `/v1/federation/jobs/${id}`);
    return until(json) ? json : undefined;
  }, what, timeoutMs);

const BASE = { rounds: 1, round_timeout_ms: 60_000, lora: { r: 4, alpha: 8, target_modules: ['q_proj', 'v_proj'] }, local: { steps: 2, batch_size: 2, seq_len: 16 } };

describe('bad job specs get 4xx with named codes', () => {
  const cases: [string, Record<string, unknown>, number, string][] = [
    ['unknown method', { method: 'fedprox' }, 400, 'fed_method_unknown'],
    ['rank over the maximum', { method: 'ffa', lora: { r: 128 } }, 422, 'fed_rank_too_large'],
    ['a target module the model lacks', { method: 'ffa', lora: { r: 4, target_modules: ['attn_proj'] } }, 422, 'fed_target_module_unknown'],
    ['min_clients above the clients', { method: 'ffa', min_clients: 4 }, 400, 'fed_min_clients_too_high'],
    ['no clients', { method: 'ffa', clients: undefined }, 400, 'fed_job_invalid'],
    ['an unknown field', { method: 'ffa', rounds_per_day: 3 }, 400, 'fed_job_invalid'],
    ['a per-client rank map outside flora', { method: 'fedavg', lora: { r: { alpha: 4 } } }, 400, 'fed_job_invalid'],
    ['a bad adapter id', { method: 'ffa', target_adapter_id: '../etc' }, 400, 'fed_job_invalid'],
  ];
  for (const [what, over, status, code] of cases) {
    test(`${what} → ${status} ${code}`, async () => {
      const { status: got, json } = await api<{ error: { code: string; message: string } }>('POST', '/v1/federation/jobs', { target_adapter_id: 'bad', clients: ['alpha', 'beta'], ...BASE, ...over });
      assert.equal(got, status, JSON.stringify(json));
      assert.equal(json.error.code, code);
      assert.ok(json.error.message.length > 10);
    });
  }
  test('unknown job → 404 fed_job_not_found on show and cancel', async () => {
    assert.equal((await api<{ error: { code: string } }>('GET', '/v1/federation/jobs/fj-nope')).json.error.code, 'fed_job_not_found');
    assert.equal((await api('POST', '/v1/federation/jobs/fj-nope/cancel')).status, 404);
  });
});

test('GET /v1/federation/clients lists the live clients with a matching base model', async () => {
  const { status, json } = await api<{ data: { id: string; compatible: boolean; last_seen: number }[] }>('GET', '/v1/federation/clients');
  assert.equal(status, 200);
  assert.deepEqual(json.data.map((c) => c.id).sort(), ['alpha', 'beta', 'gamma']);
  for (const c of json.data) assert.equal(c.compatible, true);
});

/** A worker on a client's queue that answers every task with a crafted update: a broken or hostile client. */
async function forge(client: string, spoil: (task: TrainTask, factors: FactorSet) => { bytes: Buffer }): Promise<void> {
  const config = await readModelConfig(modelDir);
  const w = new Worker(
    FederationKeys.clientQueue(client),
    async (job: Job<TrainTask>): Promise<UpdateRef> => {
      const t = job.data;
      const modules = moduleSpecsFor(config, { r: t.lora.rank, alpha: t.lora.alpha, targetModules: t.lora.targetModules });
      const factors: FactorSet = new Map(modules.map((m) => [m.modulePath, { ...m, b: new Float32Array(m.outFeatures * m.rank).fill(0.01) }]));
      const { bytes } = spoil(t, factors);
      await redis.set(t.updateKey, bytes, 'PX', t.updateTtlMs);
      return { key: t.updateKey, sha256: createHash('sha256').update(bytes).digest('hex'), bytes: bytes.length, num_examples: 5, train_loss: 1, train_seconds: 0 };
    },
    { connection: forgerConnections[forgerConnections.push(redis.duplicate({ maxRetriesPerRequest: null })) - 1], prefix },
  );
  forgers.push(w);
}

test('malformed updates (NaN, wrong shape, wrong round) are rejected with their reasons while the round publishes from the valid ones', async () => {
  const meta = (t: TrainTask) => ({ job: t.job, round: t.round, client: t.client, method: t.method, numExamples: 5, trainLoss: 1 });
  await forge('evil-nan', (t, f) => {
    [...f.values()][0].b![3] = Number.NaN;
    return { bytes: encodeUpdate(meta(t), f) };
  });
  await forge('evil-shape', (t, f) => {
    const m = [...f.values()][0];
    f.set(m.modulePath, { ...m, rank: 3, b: new Float32Array(m.outFeatures * 3) });
    return { bytes: encodeUpdate(meta(t), f) };
  });
  await forge('evil-round', (t, f) => ({ bytes: encodeUpdate({ ...meta(t), round: t.round + 1 }, f) }));
  const { json: created } = await api<JobJson>('POST', '/v1/federation/jobs', { target_adapter_id: 'fed-faults', method: 'ffa', clients: ['alpha', 'beta', 'evil-nan', 'evil-shape', 'evil-round'], min_clients: 2, ...BASE });
  const job = await waitJob(created.id, (j) => j.state === 'completed' || j.state === 'failed', 'the round with malformed updates to end');
  assert.equal(job.state, 'completed');
  const round = job.history[0];
  assert.deepEqual([...round.participants].sort(), ['alpha', 'beta']);
  const reasonOf = (c: string) => round.clients.find((x) => x.client === c);
  assert.equal(reasonOf('evil-nan')?.status, 'rejected');
  assert.match(reasonOf('evil-nan')!.reason!, /^not_finite/);
  assert.match(reasonOf('evil-shape')!.reason!, /^shape_mismatch/);
  assert.match(reasonOf('evil-round')!.reason!, /^metadata_mismatch.*round/);
  // the audit routes hand out what was aggregated, and only that
  const kept = await fetch(`${server.url}/v1/federation/jobs/${created.id}/rounds/1/updates/alpha`);
  assert.equal(kept.status, 200);
  assert.ok((await kept.arrayBuffer()).byteLength > 100);
  assert.equal((await fetch(`${server.url}/v1/federation/jobs/${created.id}/rounds/1/updates/evil-nan`)).status, 404);
  assert.equal((await fetch(`${server.url}/v1/federation/jobs/${created.id}/rounds/1/global`)).status, 200);
  const metrics = await (await fetch(`${server.url}/metrics`)).text();
  assert.match(metrics, /lora_gateway_federation_updates_rejected_total\{reason="not_finite"\} [1-9]/);
});

test('a client killed with SIGKILL mid-training: the round completes at its deadline with the other two, the late update not counted', async () => {
  const { json: created } = await api<JobJson>('POST', '/v1/federation/jobs', {
    ...BASE,
    target_adapter_id: 'fed-killed',
    method: 'fedavg',
    clients: ['alpha', 'beta', 'gamma'],
    min_clients: 2,
    round_timeout_ms: 20_000,
    // gamma holds ~7x the text: with epochs it trains far longer than the others
    local: { epochs: 3, batch_size: 2, seq_len: 16 },
  });
  await waitJob(created.id, (j) => j.current_round?.clients.some((c) => c.client === 'gamma' && c.status === 'training') === true, 'gamma to be training', 60_000);
  clients[2].child.kill('SIGKILL');
  const job = await waitJob(created.id, (j) => j.state !== 'running' && j.state !== 'queued', 'the round to end at its deadline', 90_000);
  assert.equal(job.state, 'completed');
  const round = job.history[0];
  assert.deepEqual([...round.participants].sort(), ['alpha', 'beta']);
  assert.equal(round.clients.find((c) => c.client === 'gamma')?.status, 'late');
  assert.deepEqual(round.dropped.map((d) => d.client), ['gamma']);
});

test('cancel stops a running job: 200 with state cancelled, then 409 fed_job_finished', async () => {
  const { json: created } = await api<JobJson>('POST', '/v1/federation/jobs', { ...BASE, target_adapter_id: 'fed-cancel', method: 'ffa', clients: ['nobody-home'], round_timeout_ms: 600_000 });
  await waitJob(created.id, (j) => j.current_round !== null, 'the round to start');
  const { status, json } = await api<JobJson>('POST', `/v1/federation/jobs/${created.id}/cancel`);
  assert.equal(status, 200);
  assert.equal(json.state, 'cancelled');
  assert.equal((await api<{ error: { code: string } }>('POST', `/v1/federation/jobs/${created.id}/cancel`)).json.error.code, 'fed_job_finished');
  const list = await api<{ data: JobJson[] }>('GET', '/v1/federation/jobs');
  assert.ok(list.json.data.some((j) => j.id === created.id && j.state === 'cancelled'));
});

test('a scheduled job runs its rounds at the period, never overlapping', async () => {
  const every = 2500;
  const { json: created } = await api<JobJson>('POST', '/v1/federation/jobs', { ...BASE, target_adapter_id: 'fed-scheduled', method: 'ffa', clients: ['alpha', 'beta'], rounds: 3, schedule: { every_ms: every } });
  const job = await waitJob(created.id, (j) => j.state === 'completed', 'three scheduled rounds', 120_000);
  assert.deepEqual(job.versions, [1, 2, 3]);
  const starts = job.history.map((h) => h.started_at);
  for (let i = 1; i < starts.length; i++) assert.ok(starts[i] - starts[0] >= i * every - 50, `round ${i + 1} started ${starts[i] - starts[0]} ms after round 1, period ${every}`);
  for (let i = 1; i < job.history.length; i++) assert.ok(job.history[i].started_at >= (job.history[i - 1] as unknown as { finished_at: number }).finished_at, 'rounds do not overlap');
});
