import assert from 'node:assert/strict';
import { mkdtemp, readdir, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { writeDemoModel } from '../../src/cli/demo-model-command.js';
import { eventually, spawnCli, startClients, startPrivateRedis, uniquePrefix, writeEraText, type CliProcess } from '../helpers/federation-fixture.js';

let root: string;
let modelDir: string;
let redis: Awaited<ReturnType<typeof startPrivateRedis>>;
let clients: CliProcess[] = [];
let gateway: CliProcess | undefined;
const prefix = uniquePrefix('crash');

before(async () => {
  root = await mkdtemp(join(tmpdir(), 'lora-gateway-fedcrash-'));
  modelDir = join(root, 'model');
  await writeDemoModel(modelDir, { adapters: 0 });
  redis = await startPrivateRedis();
  const data = await Promise.all(['one', 'two'].map((c, i) => writeEraText(join(root, 'data'), c, 1800 + i * 100, 1899 + i * 100, 6000)));
  clients = await startClients(modelDir, redis.url, prefix, [
    ['one', data[0]],
    ['two', data[1]],
  ]);
});

after(async () => {
  await gateway?.stop('SIGKILL');
  await Promise.all(clients.map((c) => c.stop('SIGKILL')));
  await redis?.stop();
  await rm(root, { recursive: true, force: true });
});

async function startGateway(): Promise<{ proc: CliProcess; url: string }> {
  const proc = spawnCli(['serve', '--model', modelDir, '--data', join(root, 'serve'), '--port', '0', '--backend', 'wasm', '--redis', redis.url, '--federation-prefix', prefix]);
  const m = await proc.waitFor(/ at (http:\/\/\S+) \(device pool/);
  return { proc, url: m[1] };
}

/** A fedavg job over both clients; returns its id. */
async function submitJob(url: string, target: string, rounds: number, local: Record<string, number>): Promise<string> {
  const res = await fetch(`${url}/v1/federation/jobs`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ target_adapter_id: target, method: 'fedavg', rounds, clients: ['one', 'two'], round_timeout_ms: 60_000, lora: { r: 4, alpha: 8, target_modules: ['q_proj', 'v_proj'] }, local }),
  });
  assert.equal(res.status, 201);
  return ((await res.json()) as { id: string }).id;
}

test('the gateway killed with SIGKILL mid-round and started again: the job resumes and each round publishes exactly once', async () => {
  let gw = await startGateway();
  gateway = gw.proc;
  const id = await submitJob(gw.url, 'fed-crash', 3, { epochs: 1, batch_size: 2, seq_len: 16 });
  // kill it while round 2 trains: round 1 is published, round 2 is in flight
  await eventually(async () => {
    const j = (await (await fetch(`${gw.url}/v1/federation/jobs/${id}`)).json()) as { current_round: { round: number; clients: { status: string }[] } | null };
    return j.current_round?.round === 2 && j.current_round.clients.some((c) => c.status === 'training') ? true : undefined;
  }, 'round 2 to be training');
  gw.proc.child.kill('SIGKILL');
  await gw.proc.stop();

  gw = await startGateway();
  gateway = gw.proc;
  const done = await eventually(async () => {
    const j = (await (await fetch(`${gw.url}/v1/federation/jobs/${id}`)).json()) as { state: string; versions: number[]; history: { round: number; state: string }[] };
    if (j.state === 'failed') throw new Error(JSON.stringify(j));
    return j.state === 'completed' ? j : undefined;
  }, 'the resumed job to complete');
  assert.deepEqual(done.versions, [1, 2, 3]);
  assert.deepEqual(
    done.history.filter((h) => h.state === 'published').map((h) => h.round),
    [1, 2, 3],
  );
  // on disk: exactly one version per round, each with its own provenance
  const dir = join(root, 'serve', 'adapters', 'fed-crash');
  const versions = (await readdir(dir)).filter((v) => /^v\d+$/.test(v)).sort();
  assert.deepEqual(versions, ['v1', 'v2', 'v3']);
  const rounds = await Promise.all(versions.map(async (v) => (JSON.parse(await readFile(join(dir, v, 'manifest.json'), 'utf8')) as { provenance: { round: number; job: string } }).provenance));
  assert.deepEqual(
    rounds.map((p) => [p.job, p.round]),
    [
      [id, 1],
      [id, 2],
      [id, 3],
    ],
  );
  // and the adapter serves
  const c = await fetch(`${gw.url}/v1/completions`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ model: 'fed-crash', prompt: 'Hello', max_tokens: 2 }) });
  assert.equal(c.status, 200);
});

test('the gateway killed with SIGKILL while it writes a round\'s new version: on restart the store holds no partial version, the previous version serves, and the round publishes once', async (t) => {
  // the previous test's gateway: one gateway per data folder at a time
  await gateway?.stop();
  let gw = await startGateway();
  gateway = gw.proc;
  const store = join(root, 'serve', 'adapters');
  const id = await submitJob(gw.url, 'fed-publish', 2, { steps: 2, batch_size: 2, seq_len: 16 });
  await eventually(async () => {
    const j = (await (await fetch(`${gw.url}/v1/federation/jobs/${id}`)).json()) as { versions: number[] };
    return j.versions.length === 1 ? true : undefined;
  }, 'round 1 to publish');
  // round 2's publish writes its version into a .tmp- folder of the store first: the moment one
  // appears, the gateway is killed, inside the write (fsyncs, manifest, rename)
  const { watch } = await import('node:fs');
  let killedInWrite = false;
  const watcher = watch(store, (_event, name) => {
    if (!killedInWrite && typeof name === 'string' && name.startsWith('.tmp-')) {
      killedInWrite = true;
      gw.proc.child.kill('SIGKILL');
    }
  });
  try {
    await gw.proc.waitFor(/never printed/, 120_000).catch(() => undefined);
  } finally {
    watcher.close();
  }
  assert.ok(killedInWrite, 'the kill landed while a version was being written');
  const left = await readdir(store);
  t.diagnostic(`store at the kill: ${left.join(', ')}`);
  gw = await startGateway();
  gateway = gw.proc;
  // at once after the restart: the latest version is a whole one and it serves
  const listed = (await (await fetch(`${gw.url}/v1/adapters/fed-publish/versions`)).json()) as { data: { version: number; provenance: { round: number } }[] };
  assert.ok(listed.data.length >= 1 && listed.data.length <= 2, JSON.stringify(listed));
  listed.data.forEach((v, i) => assert.equal(v.provenance.round, i + 1, 'each listed version is its round'));
  const c = await fetch(`${gw.url}/v1/completions`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ model: 'fed-publish', prompt: 'Hello', max_tokens: 2 }) });
  assert.equal(c.status, 200);
  assert.ok(!(await readdir(store)).some((n) => n.startsWith('.tmp-')), `the interrupted write is cleaned up (left at the kill: ${left.join(', ')})`);
  const done = await eventually(async () => {
    const j = (await (await fetch(`${gw.url}/v1/federation/jobs/${id}`)).json()) as { state: string; versions: number[] };
    if (j.state === 'failed') throw new Error(JSON.stringify(j));
    return j.state === 'completed' ? j : undefined;
  }, 'the resumed job to complete');
  assert.deepEqual(done.versions, [1, 2]);
  const versions = (await readdir(join(store, 'fed-publish'))).filter((v) => /^v\d+$/.test(v)).sort();
  assert.deepEqual(versions, ['v1', 'v2'], 'round 2 published exactly once');
});
