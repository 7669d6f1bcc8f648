import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { epsilonOf } from '../../src/federation/privacy/rdp-accountant.js';
import { SafetensorsReader } from '../../src/model/formats/safetensors.js';
import { eventually, startEraFederation, THREE_ERAS, type CliProcess, type EraFederation } from '../helpers/federation-fixture.js';
import { useWasm } from '../helpers/tiny-models.js';

let fx: EraFederation;
let server: EraFederation['server'];
let clients: CliProcess[] = [];

before(async () => {
  await useWasm();
  // a fourth client uploads its change from the global ×100: the attack norm_bound must contain
  fx = await startEraFederation('privacy', THREE_ERAS, 2000, [{ id: 'evil', from: 1930, to: 1960, args: ['--poison', 'scale:100'] }]);
  ({ server, clients } = fx);
});

after(async () => fx?.stop());

interface RoundJson {
  round: number;
  published_version: number;
  sample_rate?: number;
  participants: string[];
  rules?: { norms: Record<string, number>; bounded: string[]; clipped: string[]; noise_std?: number };
}
interface JobJson {
  id: string;
  state: string;
  versions: number[];
  history: RoundJson[];
  error: unknown;
  privacy?: { epsilon: number; delta: number; noise_multiplier: number; history: { noise_multiplier: number; sample_rate: number; steps: number }[] };
  stop_reason?: { code: string; message: string };
}

const api = <T>(method: string, path: string, body?: unknown) => server.api<T>(method, path, body);

async function finished(id: string, states = ['completed']): Promise<JobJson> {
  return eventually(async () => {
    const { json } = await api<JobJson>('GET', `/v1/federation/jobs/${id}`);
    if (json.state === 'failed' || json.state === 'cancelled') throw new Error(`job ${json.state}: ${JSON.stringify(json.error)}`);
    return states.includes(json.state) ? json : undefined;
  }, `job ${id} to finish`);
}

/** lora_B of every module of a published version, flattened (ffa trains only B). */
async function servedB(adapter: string, version: number): Promise<Float64Array[]> {
  const res = await fetch(`${server.url}/v1/adapters/${adapter}/files/adapter_model.safetensors?version=${version}`);
  assert.equal(res.status, 200);
  const reader = await SafetensorsReader.fromBytes(new Uint8Array(await res.arrayBuffer()), 'download');
  const out: Float64Array[] = [];
  await reader.readTensors((e, data) => {
    if (e.name.includes('lora_B')) out.push(Float64Array.from(data));
  });
  await reader.close();
  return out;
}

const LOCAL = { steps: 2, batch_size: 2, lr: 0.05, seq_len: 32 };

describe('differential privacy and robust aggregation over real fed-client processes', () => {
  test('a client-level DP job records in every version and in the job the ε the RDP accountant gives for its rounds', async () => {
    const spec = { target_adapter_id: 'dp-ffa', method: 'ffa', clients: ['founders', 'industrial', 'modern'], rounds: 2, local: LOCAL, dp: { level: 'client', clip_norm: 0.05, noise_multiplier: 1.1, delta: 1e-5 } };
    const created = await api<JobJson>('POST', '/v1/federation/jobs', spec);
    assert.equal(created.status, 201, JSON.stringify(created.json));
    const job = await finished(created.json.id);
    assert.equal(job.versions.length, 2);
    // a fixed client list samples everyone: q = 1, one step per published round
    const want = epsilonOf([{ noiseMultiplier: 1.1, sampleRate: 1, steps: 2 }], 1e-5);
    const { json } = await api<{ version: number; provenance: { round: number; privacy: { epsilon: number; delta: number; order: number; rounds_accounted: number; noise_multiplier: number; clip_norm: number } } }>('GET', '/v1/adapters/dp-ffa');
    assert.equal(json.version, job.versions[1]);
    assert.equal(json.provenance.round, 2);
    assert.equal(json.provenance.privacy.epsilon, want.epsilon);
    assert.equal(json.provenance.privacy.order, want.order);
    assert.equal(json.provenance.privacy.delta, 1e-5);
    assert.equal(json.provenance.privacy.rounds_accounted, 2);
    assert.equal(json.provenance.privacy.noise_multiplier, 1.1);
    assert.equal(json.provenance.privacy.clip_norm, 0.05);
    const versions = (await api<{ data: { version: number; source: { kind: string; job: string; round: number } }[] }>('GET', '/v1/adapters/dp-ffa/versions')).json.data;
    assert.deepEqual(versions.map((v) => [v.version, v.source.kind, v.source.job, v.source.round]), job.versions.map((v, i) => [v, 'federated_round', job.id, i + 1]));
    assert.equal(job.privacy!.epsilon, epsilonOf([{ noiseMultiplier: 1.1, sampleRate: 1, steps: 2 }], 1e-5).epsilon);
    assert.deepEqual(job.privacy!.history, [{ noise_multiplier: 1.1, sample_rate: 1, steps: 2 }]);
    const r1 = job.history.find((r) => r.round === 1)!;
    assert.equal(r1.sample_rate, 1);
    assert.equal(r1.rules!.noise_std, (1.1 * 0.05) / 3);
    // no secret leaks through the record
    assert.ok(!JSON.stringify(job).includes('noise-key') && !JSON.stringify(job).includes('noiseKey'));
  });

  test('a job whose planned rounds would overspend target_epsilon is refused with 400 naming the ε it would reach', async () => {
    const spec = { target_adapter_id: 'dp-over', method: 'ffa', clients: ['founders', 'modern'], rounds: 50, local: LOCAL, dp: { level: 'client', clip_norm: 1, noise_multiplier: 1, target_epsilon: 3 } };
    const res = await api<{ error: { code: string; message: string } }>('POST', '/v1/federation/jobs', spec);
    assert.equal(res.status, 400);
    assert.equal(res.json.error.code, 'fed_dp_budget_exceeded');
    const would = epsilonOf([{ noiseMultiplier: 1, sampleRate: 1, steps: 50 }], 1e-5).epsilon;
    assert.ok(res.json.error.message.includes(would.toPrecision(6)), res.json.error.message);
  });

  test('norm_bound holds a --poison scale:100 client to its share of the bound: the published update moves by at most Σ p_k·min(‖Δ_k‖, S)', async () => {
    const four = ['evil', 'founders', 'industrial', 'modern'];
    const run = async (id: string, bound: number) => {
      const created = await api<JobJson>('POST', '/v1/federation/jobs', { target_adapter_id: id, method: 'ffa', clients: four, rounds: 1, local: LOCAL, robust: { norm_bound: bound } });
      assert.equal(created.status, 201, JSON.stringify(created.json));
      return finished(created.json.id);
    };
    // first with a bound that never binds, to see the updates' norms (training is seeded: the same next time)
    const open = await run('robust-open', 1e9);
    const norms = open.history[0].rules!.norms;
    const honest = Math.max(norms.founders, norms.industrial, norms.modern);
    assert.ok(norms.evil > 30 * honest, `the poisoned update is ~100× an honest one: ${JSON.stringify(norms)}`);
    const S = 2 * honest;
    const held = await run('robust-held', S);
    const r = held.history[0];
    assert.deepEqual(r.rules!.bounded, ['evil']);
    assert.deepEqual(r.rules!.norms, norms);
    // round 1 of ffa starts from B = 0, so the published B is the aggregated update itself
    const examples = Object.fromEntries((held.history[0] as unknown as { clients: { client: string; num_examples: number }[] }).clients.map((c) => [c.client, c.num_examples]));
    const total = four.reduce((t, c) => t + examples[c], 0);
    const bound = four.reduce((t, c) => t + (examples[c] / total) * Math.min(norms[c], S), 0);
    const b = await servedB('robust-held', held.versions[0]);
    const moved = Math.sqrt(b.reduce((t, x) => t + x.reduce((u, v) => u + v * v, 0), 0));
    assert.ok(moved <= bound * (1 + 1e-5), `moved ${moved}, bound ${bound}`);
    const bOpen = await servedB('robust-open', open.versions[0]);
    const movedOpen = Math.sqrt(bOpen.reduce((t, x) => t + x.reduce((u, v) => u + v * v, 0), 0));
    assert.ok(movedOpen > 10 * moved, `unbounded, the attacker dominates: ${movedOpen} vs ${moved}`);
  });

  test('sample-level DP: clients train with DP-SGD and every version records each client’s ε from its q = batch / n and steps', async () => {
    const spec = { target_adapter_id: 'dp-sgd', method: 'ffa', clients: ['founders', 'industrial', 'modern'], rounds: 2, local: LOCAL, dp: { level: 'sample', clip_norm: 1, noise_multiplier: 1.3, delta: 1e-5 } };
    const created = await api<JobJson>('POST', '/v1/federation/jobs', spec);
    assert.equal(created.status, 201, JSON.stringify(created.json));
    const job = await finished(created.json.id);
    const examples = Object.fromEntries((job.history[0] as unknown as { clients: { client: string; num_examples: number }[] }).clients.map((c) => [c.client, c.num_examples]));
    const { json } = await api<{ provenance: { privacy: { level: string; epsilon: number; per_client: Record<string, { epsilon: number; steps: number; sample_rate: number }> } } }>('GET', '/v1/adapters/dp-sgd');
    const priv = json.provenance.privacy;
    assert.equal(priv.level, 'sample');
    let worst = 0;
    for (const c of ['founders', 'industrial', 'modern']) {
      const q = Math.min(1, LOCAL.batch_size / examples[c]);
      // two rounds of two local DP-SGD steps each
      const want = epsilonOf([{ noiseMultiplier: 1.3, sampleRate: q, steps: 4 }], 1e-5).epsilon;
      assert.equal(priv.per_client[c].epsilon, want, c);
      assert.equal(priv.per_client[c].steps, 4);
      assert.equal(priv.per_client[c].sample_rate, q);
      worst = Math.max(worst, want);
    }
    assert.equal(priv.epsilon, worst);
    assert.equal(job.privacy!.epsilon, worst);
  });

  test('sample-level DP: a client refuses a round that would take it past target_epsilon, and the job stops', async () => {
    const spec = { target_adapter_id: 'dp-sgd-over', method: 'ffa', clients: ['founders', 'modern'], rounds: 1, local: LOCAL, dp: { level: 'sample', clip_norm: 1, noise_multiplier: 0.5, target_epsilon: 0.01 } };
    const created = await api<JobJson>('POST', '/v1/federation/jobs', spec);
    assert.equal(created.status, 201, JSON.stringify(created.json));
    const job = await finished(created.json.id, ['stopped']);
    assert.equal(job.stop_reason!.code, 'privacy_budget_exhausted');
    assert.deepEqual(job.versions, []);
    const clients = (job.history[0] as unknown as { clients: { client: string; status: string; reason?: string }[] }).clients;
    for (const c of clients) assert.match(c.reason ?? '', /privacy_budget_exhausted/, JSON.stringify(c));
  });

  test('a scheduled DP job stops before the round that would cross target_epsilon when fewer clients make each round spend more', async () => {
    // planned at q = 1/4 (four live clients, one per round); once only one client is live, q = 1
    const live = (await api<{ data: unknown[] }>('GET', '/v1/federation/clients')).json.data.length;
    assert.equal(live, 4);
    const planQ = 0.25;
    const target = epsilonOf([{ noiseMultiplier: 2, sampleRate: planQ, steps: 3 }], 1e-5).epsilon + 1e-6;
    const spec = { target_adapter_id: 'dp-stop', method: 'ffa', clients_per_round: 1, rounds: 3, schedule: { every_ms: 4000 }, round_timeout_ms: 60_000, local: LOCAL, dp: { level: 'client', clip_norm: 1, noise_multiplier: 2, target_epsilon: target } };
    const created = await api<JobJson>('POST', '/v1/federation/jobs', spec);
    assert.equal(created.status, 201, JSON.stringify(created.json));
    await eventually(async () => ((await api<JobJson>('GET', `/v1/federation/jobs/${created.json.id}`)).json.versions.length >= 1 ? true : undefined), 'round 1');
    // three clients leave (a stopped client deregisters): the next round would sample the last one with q = 1
    const leaving = clients.filter((_, i) => i !== 0);
    await Promise.all(leaving.map((c) => c.stop()));
    const job = await finished(created.json.id, ['stopped', 'completed']);
    assert.equal(job.state, 'stopped', JSON.stringify(job.history.map((r) => [r.round, r.sample_rate])));
    assert.equal(job.stop_reason!.code, 'privacy_budget_exhausted');
    assert.ok(job.privacy!.epsilon <= target);
    assert.ok(job.versions.length < 3);
  });
});
