import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { Redis } from 'ioredis';
import { serve } from '../../src/cli/serve-command.js';
import { writeDemoModel } from '../../src/cli/demo-model-command.js';
import { parseEngineConfig, parseServeConfig } from '../../src/config.js';
import { fedClientAcl } from '../../src/federation/client-acl.js';
import { FederationKeys } from '../../src/federation/federation-keys.js';
import { createApiKey } from '../../src/tenants/api-key-file.js';
import { REDIS_URL, dropPrefix, eventually, spawnCli, uniquePrefix, writeEraText, type CliProcess } from '../helpers/federation-fixture.js';
import { useWasm } from '../helpers/tiny-models.js';

/**
 * Two tenants share one federated server and one Redis. Each tenant's fed-client runs as its
 * own Redis ACL user (lora-gateway fed-client-acl), and each tenant drives federation through
 * the HTTP API with its own key: neither can see the other's jobs, clients or adapters.
 */
let root: string;
let server: Awaited<ReturnType<typeof serve>>;
const clients: CliProcess[] = [];
const prefix = uniquePrefix('tenantfed');
const admin = new Redis(REDIS_URL, { maxRetriesPerRequest: null });
const users: string[] = [];
const key: Record<string, string> = {};

async function aclUser(client: string): Promise<string> {
  const acl = fedClientAcl(prefix, client);
  await admin.call('ACL', 'SETUSER', `${acl.user}-${prefix}`, ...acl.rules);
  users.push(`${acl.user}-${prefix}`);
  const u = new URL(REDIS_URL);
  u.username = `${acl.user}-${prefix}`;
  u.password = acl.password;
  return u.toString();
}

before(async () => {
  await useWasm();
  root = await mkdtemp(join(tmpdir(), 'lora-gateway-tenantfed-'));
  const modelDir = join(root, 'model');
  await writeDemoModel(modelDir, { adapters: 0 });
  const keysFile = join(root, 'keys.json');
  key.acme = (await createApiKey(keysFile, 'acme', 'tenant')).key;
  key.beta = (await createApiKey(keysFile, 'beta', 'tenant')).key;
  key.admin = (await createApiKey(keysFile, 'ops', 'admin')).key;
  for (const [id, from, to] of [
    ['acme.east', 1790, 1850],
    ['acme.west', 1860, 1920],
    ['beta.north', 1930, 1990],
  ] as const) {
    const data = await writeEraText(join(root, 'data'), id, from, to, 2500);
    const p = spawnCli(['fed-client', '--redis', await aclUser(id), '--federation-prefix', prefix, '--client-id', id, '--data', data, '--model', modelDir, '--backend', 'wasm']);
    clients.push(p);
    await p.waitFor(/federation client '.*' ready/);
  }
  server = await serve({
    modelDir,
    engine: parseEngineConfig({ backend: 'wasm' }),
    serve: parseServeConfig({ port: 0, dataDir: join(root, 'serve'), redisUrl: REDIS_URL, federationPrefix: prefix, apiKeysPath: keysFile }),
    log: () => undefined,
  });
});

after(async () => {
  await server?.close();
  await Promise.all(clients.map((c) => c.stop('SIGKILL')));
  for (const u of users) await admin.call('ACL', 'DELUSER', u);
  await dropPrefix(admin, prefix);
  await admin.quit();
  await rm(root, { recursive: true, force: true });
});

async function api<T = Record<string, unknown>>(who: string, method: string, path: string, body?: unknown): Promise<{ status: number; json: T }> {
  const headers: Record<string, string> = { authorization: `Bearer ${key[who]}` };
  if (body !== undefined) headers['content-type'] = 'application/json';
  const res = await fetch(`${server.url}${path}`, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  const text = await res.text();
  return { status: res.status, json: (text.startsWith('{') ? JSON.parse(text) : text) as T };
}

const spec = (clientIds: string[]) => ({
  target_adapter_id: 'support',
  method: 'fedavg',
  rounds: 1,
  clients: clientIds,
  lora: { r: 2, alpha: 4, target_modules: ['q_proj'] },
  local: { steps: 2, batch_size: 2, seq_len: 16 },
  round_timeout_ms: 120_000,
});

test("a tenant's federated job trains on its own clients (each confined by its Redis ACL user), publishes the tenant's adapter, and is invisible to another tenant", async () => {
  const submitted = await api<{ id: string; target_adapter_id: string }>('acme', 'POST', '/v1/federation/jobs', spec(['acme.east', 'acme.west']));
  assert.equal(submitted.status, 201, JSON.stringify(submitted.json));
  assert.equal(submitted.json.target_adapter_id, 'support', 'the tenant sees its own name for the adapter');
  const id = submitted.json.id;
  const done = await eventually(async () => {
    const r = await api<{ state: string }>('acme', 'GET', `/v1/federation/jobs/${id}`);
    return ['completed', 'failed', 'stopped', 'cancelled'].includes(r.json.state) ? r.json : undefined;
  }, 'the job to finish', 180_000).catch((err: Error) => {
    throw new Error(`${err.message}\n${clients.map((c) => c.log()).join('\n')}`);
  });
  assert.equal(done.state, 'completed', JSON.stringify(done));

  // the published adapter is acme's: acme lists and uses it as 'support', beta does not see it
  const acmeModels = await api<{ data: { id: string }[] }>('acme', 'GET', '/v1/models');
  assert.ok(acmeModels.json.data.some((m) => m.id === 'support'));
  const betaModels = await api<{ data: { id: string }[] }>('beta', 'GET', '/v1/models');
  assert.ok(!betaModels.json.data.some((m) => m.id.includes('support')));
  const use = await api('acme', 'POST', '/v1/completions', { model: 'support', prompt: 'The', max_tokens: 2 });
  assert.equal(use.status, 200, JSON.stringify(use.json));
  const adminView = await api<{ tenant?: string; id: string }>('admin', 'GET', '/v1/adapters/acme~support');
  assert.equal(adminView.status, 200);
  assert.equal(adminView.json.tenant, 'acme', "the owner is recorded in the version's manifest");

  // beta: the job answers as a missing one on every route
  const missing = await api<{ error: { code: string; message: string } }>('beta', 'GET', '/v1/federation/jobs/fj-000000000000');
  for (const [method, path] of [
    ['GET', `/v1/federation/jobs/${id}`],
    ['POST', `/v1/federation/jobs/${id}/cancel`],
    ['GET', `/v1/federation/jobs/${id}/rounds/1/global`],
    ['GET', `/v1/federation/jobs/${id}/rounds/1/updates/acme.east`],
  ]) {
    const r = await api<{ error: { code: string; message: string } }>('beta', method, path);
    assert.equal(r.status, 404, `${method} ${path}`);
    assert.equal(r.json.error.code, missing.json.error.code);
    assert.equal(r.json.error.message, missing.json.error.message.replace('fj-000000000000', id));
  }
  assert.deepEqual((await api<{ data: unknown[] }>('beta', 'GET', '/v1/federation/jobs')).json.data, []);
  const betaClients = (await api<{ data: { id: string }[] }>('beta', 'GET', '/v1/federation/clients')).json.data.map((c) => c.id);
  assert.deepEqual(betaClients, ['beta.north']);
  const adminJobs = (await api<{ data: { id: string; tenant?: string }[] }>('admin', 'GET', '/v1/federation/jobs')).json.data;
  assert.deepEqual(
    adminJobs.map((j) => [j.id, j.tenant]),
    [[id, 'acme']],
  );
  // beta may not train on acme's clients, nor publish into acme's namespace
  const foreign = await api<{ error: { code: string } }>('beta', 'POST', '/v1/federation/jobs', spec(['acme.east']));
  assert.equal(foreign.status, 400);
  assert.equal(foreign.json.error.code, 'fed_job_invalid');
  const qualified = await api<{ error: { code: string } }>('beta', 'POST', '/v1/federation/jobs', { ...spec(['beta.north']), target_adapter_id: 'acme~support' });
  assert.equal(qualified.status, 400);
  const reserved = await api<{ error: { code: string } }>('beta', 'POST', '/v1/federation/jobs', { ...spec(['beta.north']), target_adapter_id: 'model' });
  assert.equal(reserved.status, 409, "a job may not target the served model's name");
  assert.equal(reserved.json.error.code, 'adapter_id_reserved');
});

test("a client's Redis ACL user can write only its own update keys and read only its own queue: another client's updates, queue and the job records answer NOPERM", async () => {
  const keys = new FederationKeys(prefix);
  const url = await aclUser('beta.probe');
  const probe = new Redis(url, { maxRetriesPerRequest: null });
  try {
    const noperm = (p: Promise<unknown>) => assert.rejects(p, /NOPERM/);
    await probe.set(keys.update('fj-x', 1, 1, 'beta.probe'), 'mine');
    await noperm(probe.set(keys.update('fj-x', 1, 1, 'acme.east'), 'forged'));
    await noperm(probe.get(keys.update('fj-x', 1, 1, 'acme.east')));
    await noperm(probe.lrange(`${prefix}:${FederationKeys.clientQueue('acme.east')}:wait`, 0, -1));
    await noperm(probe.get(keys.job('fj-x')));
    await noperm(probe.get(keys.noiseKey('fj-x')));
    await noperm(probe.set(keys.client('acme.east'), '{}'));
    await noperm(probe.scan('0'));
    await noperm(probe.keys('*'));
  } finally {
    await probe.quit();
  }
});
