import assert from 'node:assert/strict';
import { mkdir, mkdtemp, readFile, rm, symlink } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import OpenAI from 'openai';
import { ApiKeyRing, createApiKey, readApiKeyFile, revokeApiKeys } from '../../src/tenants/api-key-file.js';
import { startGateway, type GatewayFixture } from '../helpers/gateway-fixture.js';

/**
 * Two tenants and an admin on one gateway over a real socket. acme owns an adapter named
 * 'secret'; every route beta can reach must answer for it exactly as for an id that does not
 * exist, and nothing beta does may change it.
 */
let fx: GatewayFixture;
let keysDir: string;
let keysFile: string;
let ring: ApiKeyRing;
const key: Record<string, string> = {};
let files: { config: Buffer; weights: Buffer };

before(async () => {
  keysDir = await mkdtemp(join(tmpdir(), 'lora-gateway-keys-'));
  keysFile = join(keysDir, 'keys.json');
  key.acme = (await createApiKey(keysFile, 'acme', 'tenant')).key;
  key.beta = (await createApiKey(keysFile, 'beta', 'tenant')).key;
  key.admin = (await createApiKey(keysFile, 'ops', 'admin')).key;
  key.revoked = (await createApiKey(keysFile, 'acme', 'tenant')).key;
  ring = await ApiKeyRing.load(keysFile);
  fx = await startGateway(1, {}, { apiKeys: () => ring, loraPathRootIsModelDir: true });
  const dir = join(fx.modelDir, 'adapters', 'demo-0');
  files = { config: await readFile(join(dir, 'adapter_config.json')), weights: await readFile(join(dir, 'adapter_model.safetensors')) };
});
after(async () => {
  await fx.close();
  await rm(keysDir, { recursive: true, force: true });
});

type Json = Record<string, unknown> & { error?: { code: string; message: string; type: string }; data?: { id: string }[] };

async function call(who: string | undefined, method: string, path: string, body?: unknown): Promise<{ status: number; json: Json }> {
  const headers: Record<string, string> = who ? { authorization: `Bearer ${key[who] ?? who}` } : {};
  let payload: BodyInit | undefined;
  if (body instanceof FormData) payload = body;
  else if (body !== undefined) {
    headers['content-type'] = 'application/json';
    payload = JSON.stringify(body);
  }
  const res = await fetch(`${fx.baseUrl}${path}`, { method, headers, body: payload });
  const text = await res.text();
  return { status: res.status, json: (text.startsWith('{') ? JSON.parse(text) : { text }) as Json };
}

function adapterForm(): FormData {
  const f = new FormData();
  f.append('adapter_config.json', new Blob([new Uint8Array(files.config)]), 'adapter_config.json');
  f.append('adapter_model.safetensors', new Blob([new Uint8Array(files.weights)]), 'adapter_model.safetensors');
  return f;
}

/** Every route that names an adapter, as tenant `who` would call it for `id`. */
function adapterRoutes(id: string): [string, string, unknown?][] {
  const prompt = { prompt: 'The', max_tokens: 2 };
  return [
    ['GET', `/v1/models/${id}`],
    ['GET', `/v1/adapters/${id}`],
    ['GET', `/v1/adapters/${id}/versions`],
    ['GET', `/v1/adapters/${id}/files/adapter_config.json`],
    ['GET', `/v1/adapters/${id}/files/adapter_model.safetensors?version=1`],
    ['POST', '/v1/completions', { model: id, ...prompt }],
    ['POST', '/v1/completions', { model: id, ...prompt, stream: true }],
    ['POST', '/v1/chat/completions', { model: id, messages: [{ role: 'user', content: 'hi' }], max_tokens: 2 }],
    ['POST', `/v1/adapters/${id}/completions`, prompt],
    ['DELETE', `/v1/adapters/${id}`],
    ['POST', '/v1/unload_lora_adapter', { lora_name: id }],
  ];
}

describe('tenants over HTTP', () => {
  test('a tenant uploads and uses its own adapter under its plain name; the admin sees it as <tenant>~<name> with its owner', async () => {
    const put = await call('acme', 'PUT', '/v1/adapters/secret', adapterForm());
    assert.equal(put.status, 201, JSON.stringify(put.json));
    assert.equal(put.json.id, 'secret');
    const use = await call('acme', 'POST', '/v1/completions', { model: 'secret', prompt: 'The', max_tokens: 2 });
    assert.equal(use.status, 200, JSON.stringify(use.json));
    assert.equal(use.json.model, 'secret');
    const mine = await call('acme', 'GET', '/v1/models');
    assert.deepEqual(mine.json.data!.map((m) => m.id).sort(), ['demo-model', 'secret'], 'its own adapters and the base model, not the unowned demo-0');
    const admin = await call('admin', 'GET', '/v1/adapters/acme~secret');
    assert.equal(admin.status, 200);
    assert.equal(admin.json.tenant, 'acme');
    assert.ok((await call('admin', 'GET', '/v1/adapters')).json.data!.some((a) => a.id === 'demo-0'), 'admin sees unowned adapters');
    const base = await call('beta', 'POST', '/v1/completions', { model: 'demo-model', prompt: 'The', max_tokens: 2 });
    assert.equal(base.status, 200, 'every tenant may use the base model');
  });

  test("another tenant's adapter answers on every route exactly as a missing one, and stays untouched", async () => {
    const before = await call('admin', 'GET', '/v1/adapters/acme~secret');
    for (const id of ['secret', 'acme~secret', 'demo-0']) {
      for (const [method, path, body] of adapterRoutes(id)) {
        const got = await call('beta', method, path, body);
        const [, missingPath, missingBody] = adapterRoutes('nothere').find(([m, p, b]) => m === method && p.replace('nothere', id) === path && JSON.stringify(b ?? null).replace('nothere', id) === JSON.stringify(body ?? null))!;
        const missing = await call('beta', method, missingPath, missingBody);
        assert.equal(got.status, missing.status, `${method} ${path}: ${JSON.stringify(got.json)}`);
        assert.ok(got.status === 404 || got.status === 400, `${method} ${path} → ${got.status}`);
        assert.equal(got.json.error?.code, missing.json.error?.code, `${method} ${path}`);
        assert.equal(got.json.error?.message, missing.json.error?.message.split('nothere').join(id), `${method} ${path}`);
      }
    }
    for (const list of ['/v1/models', '/v1/adapters']) {
      assert.ok(!(await call('beta', 'GET', list)).json.data!.some((a) => a.id.includes('secret')), list);
    }
    const afterwards = await call('admin', 'GET', '/v1/adapters/acme~secret');
    assert.deepEqual(afterwards.json, before.json, "acme's adapter is unchanged after beta's attempts");
  });

  test("a tenant's upload, load_lora_adapter or delete under the same name reaches only its own adapter", async () => {
    const put = await call('beta', 'PUT', '/v1/adapters/secret', adapterForm());
    assert.equal(put.status, 201, "beta's first 'secret' is a new adapter (version 1), not acme's version 2");
    assert.equal(put.json.version, 1);
    const load = await call('beta', 'POST', '/v1/load_lora_adapter', { lora_name: 'loaded', lora_path: 'adapters/demo-0' });
    assert.equal(load.status, 200, JSON.stringify(load.json));
    assert.equal((await call('admin', 'GET', '/v1/adapters/beta~loaded')).status, 200);
    assert.equal((await call('beta', 'DELETE', '/v1/adapters/secret')).status, 200);
    const acme = await call('acme', 'GET', '/v1/adapters/secret');
    assert.equal(acme.status, 200);
    assert.equal(acme.json.version, 1);
    const reserved = await call('beta', 'PUT', '/v1/adapters/demo-model', adapterForm());
    assert.equal(reserved.status, 409);
    assert.equal(reserved.json.error!.code, 'adapter_id_reserved');
    const tilde = await call('beta', 'PUT', '/v1/adapters/acme~secret', adapterForm());
    assert.equal(tilde.status, 400);
    assert.equal(tilde.json.error!.code, 'adapter_id_invalid');
    assert.equal((await call('acme', 'GET', '/v1/adapters/secret')).json.version, 1);
  });

  test('missing, wrong and revoked keys get 401 OpenAI-shaped errors; /health and /ready stay open; /metrics needs an admin key', async () => {
    const none = await call(undefined, 'GET', '/v1/models');
    assert.equal(none.status, 401);
    assert.equal(none.json.error!.code, 'missing_api_key');
    assert.equal(none.json.error!.type, 'authentication_error');
    const wrong = await call('sk-lgw-not-a-key', 'POST', '/v1/completions', { model: 'demo-model', prompt: 'x' });
    assert.equal(wrong.status, 401);
    assert.equal(wrong.json.error!.code, 'invalid_api_key');
    assert.equal((await call('revoked', 'GET', '/v1/models')).status, 200);
    const removed = await revokeApiKeys(keysFile, { key: key.revoked });
    assert.equal(removed.length, 1);
    assert.equal((await readApiKeyFile(keysFile)).length, 3);
    ring = await ApiKeyRing.load(keysFile);
    assert.equal((await call('revoked', 'GET', '/v1/models')).status, 401);
    assert.equal((await call(undefined, 'GET', '/health')).status, 200);
    assert.equal((await call(undefined, 'GET', '/ready')).status, 200);
    assert.equal((await call(undefined, 'GET', '/metrics')).status, 401);
    const tenantMetrics = await call('acme', 'GET', '/metrics');
    assert.equal(tenantMetrics.status, 403);
    assert.equal(tenantMetrics.json.error!.code, 'permission_denied');
    assert.equal((await call('admin', 'GET', '/metrics')).status, 200);
    // an unknown route behind auth still needs a key, so route names do not leak either
    assert.equal((await call(undefined, 'GET', '/v1/nothing')).status, 401);
  });

  test("the openai client's api_key is the tenant's key: its own adapter streams; another tenant's is NotFoundError, a wrong key AuthenticationError", async () => {
    const acme = new OpenAI({ baseURL: `${fx.baseUrl}/v1`, apiKey: key.acme, maxRetries: 0 });
    let text = '';
    for await (const chunk of await acme.completions.create({ model: 'secret', prompt: 'The', max_tokens: 3, stream: true })) text += chunk.choices[0]?.text ?? '';
    assert.ok(text.length > 0);
    const beta = new OpenAI({ baseURL: `${fx.baseUrl}/v1`, apiKey: key.beta, maxRetries: 0 });
    await assert.rejects(beta.completions.create({ model: 'secret', prompt: 'The', max_tokens: 3 }), (err: unknown) => err instanceof OpenAI.NotFoundError && err.code === 'adapter_not_found');
    const wrong = new OpenAI({ baseURL: `${fx.baseUrl}/v1`, apiKey: 'sk-lgw-wrong', maxRetries: 0 });
    await assert.rejects(wrong.models.list(), (err: unknown) => err instanceof OpenAI.AuthenticationError && err.code === 'invalid_api_key');
  });

  test('load_lora_adapter reads only under --lora-path-root, symlinks resolved, and never echoes a server path', async () => {
    const outside = await mkdtemp(join(tmpdir(), 'lora-gateway-outside-'));
    try {
      await mkdir(join(outside, 'a'));
      await symlink(join(fx.modelDir, 'adapters', 'demo-0', 'adapter_config.json'), join(outside, 'a', 'adapter_config.json'));
      await symlink(join(outside, 'a'), join(fx.modelDir, 'escape'));
      for (const lora_path of [outside, join(outside, 'a'), 'escape', '../../etc', '/etc']) {
        const r = await call('admin', 'POST', '/v1/load_lora_adapter', { lora_name: 'x', lora_path });
        assert.equal(r.status, 403, `${lora_path}: ${JSON.stringify(r.json)}`);
        assert.equal(r.json.error!.code, 'lora_path_forbidden');
        assert.ok(!r.json.error!.message.includes(fx.modelDir), 'the root folder is not revealed');
      }
      const missing = await call('admin', 'POST', '/v1/load_lora_adapter', { lora_name: 'x', lora_path: 'adapters/nope' });
      assert.equal(missing.status, 422);
      assert.ok(!missing.json.error!.message.includes(fx.modelDir), missing.json.error!.message);
      assert.equal((await call('admin', 'GET', '/v1/adapters/x')).status, 404, 'nothing was registered');
    } finally {
      await rm(join(fx.modelDir, 'escape'), { force: true });
      await rm(outside, { recursive: true, force: true });
    }
  });
});
