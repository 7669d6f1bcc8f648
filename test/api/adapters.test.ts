import assert from 'node:assert/strict';
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { buildApp } from '../../src/api/app.js';
import { FederationMetrics } from '../../src/api/federation-metrics.js';
import { GatewayMetrics } from '../../src/api/metrics.js';
import { peftConfigJson } from '../../src/model/synthetic/hf-folder-writer.js';
import { startGateway, type GatewayFixture } from '../helpers/gateway-fixture.js';

let fx: GatewayFixture;
let good: { config: Buffer; weights: Buffer };

before(async () => {
  fx = await startGateway(2, {}, { loraPathRootIsModelDir: true });
  const dir = join(fx.modelDir, 'adapters', 'demo-1');
  good = { config: await readFile(join(dir, 'adapter_config.json')), weights: await readFile(join(dir, 'adapter_model.safetensors')) };
});
after(() => fx.close());

function form(files: { config?: Buffer | string; weights?: Buffer }): FormData {
  const f = new FormData();
  const blob = (b: Buffer | string) => new Blob([typeof b === 'string' ? b : new Uint8Array(b)]);
  if (files.config !== undefined) f.append('adapter_config.json', blob(files.config), 'adapter_config.json');
  if (files.weights !== undefined) f.append('adapter_model.safetensors', blob(files.weights), 'adapter_model.safetensors');
  return f;
}

async function put(id: string, body: FormData): Promise<{ status: number; json: Record<string, unknown> }> {
  const res = await fetch(`${fx.baseUrl}/v1/adapters/${encodeURIComponent(id)}`, { method: 'PUT', body });
  return { status: res.status, json: (await res.json()) as Record<string, unknown> };
}

async function listIds(): Promise<string[]> {
  const res = await fetch(`${fx.baseUrl}/v1/adapters`);
  return ((await res.json()) as { data: { id: string }[] }).data.map((a) => a.id).sort();
}

describe('adapter management over HTTP', () => {
  test('GET /v1/adapters lists registered adapters with rank, targets, size, version, residence and parent', async () => {
    const res = await fetch(`${fx.baseUrl}/v1/adapters`);
    assert.equal(res.status, 200);
    const body = (await res.json()) as { data: Record<string, unknown>[] };
    assert.deepEqual(body.data.map((a) => a.id).sort(), ['demo-0', 'demo-1']);
    const a = body.data.find((x) => x.id === 'demo-1')!;
    assert.equal(a.parent, 'demo-model');
    assert.equal(a.rank, 8);
    assert.equal(a.version, 1);
    assert.ok(['disk', 'host', 'device'].includes(a.residence as string));
    assert.ok((a.size_bytes as number) > 0);
    const one = await fetch(`${fx.baseUrl}/v1/adapters/demo-0`);
    assert.equal(((await one.json()) as { id: string }).id, 'demo-0');
  });

  test('PUT uploads a new adapter (201), re-PUT makes version 2 (200), DELETE removes it', async () => {
    const first = await put('cust-7', form(good));
    assert.equal(first.status, 201);
    assert.equal(first.json.version, 1);
    const second = await put('cust-7', form(good));
    assert.equal(second.status, 200);
    assert.equal(second.json.version, 2);
    const del = await fetch(`${fx.baseUrl}/v1/adapters/cust-7`, { method: 'DELETE' });
    assert.equal(del.status, 200);
    assert.deepEqual(await listIds(), ['demo-0', 'demo-1']);
    const missing = await fetch(`${fx.baseUrl}/v1/adapters/cust-7`);
    assert.equal(missing.status, 404);
    assert.equal(((await missing.json()) as { error: { code: string } }).error.code, 'adapter_not_found');
  });

  test('re-uploading an adapter while a request streams on it: the request completes, new requests get version 2', async () => {
    await put('hot', form(good));
    const body = JSON.stringify({ model: 'hot', prompt: 'hello', max_tokens: 40, temperature: 0, ignore_eos: true, stream: true });
    const res = await fetch(`${fx.baseUrl}/v1/completions`, { method: 'POST', headers: { 'content-type': 'application/json' }, body });
    assert.equal(res.status, 200);
    const reader = res.body!.getReader();
    await reader.read(); // the stream has started on version 1
    const swap = await put('hot', form({ ...good, weights: good.weights }));
    assert.equal(swap.status, 200);
    assert.equal(swap.json.version, 2);
    let text = '';
    for (let r = await reader.read(); !r.done; r = await reader.read()) text += new TextDecoder().decode(r.value);
    assert.match(text, /data: \[DONE\]/);
    assert.doesNotMatch(text, /"error"/);
    const next = await fetch(`${fx.baseUrl}/v1/completions`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ model: 'hot', prompt: 'hello', max_tokens: 2 }),
    });
    assert.equal(next.status, 200);
    assert.equal(((await (await fetch(`${fx.baseUrl}/v1/adapters/hot`)).json()) as { version: number }).version, 2);
    await fetch(`${fx.baseUrl}/v1/adapters/hot`, { method: 'DELETE' });
  });

  test('bad uploads get 4xx with a JSON error and change nothing', async () => {
    const before = await listIds();
    const nan = Buffer.from(good.weights);
    nan.writeFloatLE(NaN, nan.length - 4);
    const bigRank = Buffer.from(JSON.stringify(peftConfigJson({ r: 128, loraAlpha: 16, targetModules: ['q_proj'] })));
    const wrongShape = Buffer.from(JSON.stringify({ ...JSON.parse(good.config.toString()), r: 4 }));
    const cases: [string, FormData, number, string][] = [
      ['demo-1', form({ ...good, weights: good.weights.subarray(0, 100) }), 422, 'adapter_weights_invalid'],
      ['demo-1', form({ ...good, weights: nan }), 422, 'adapter_weights_invalid'],
      ['demo-1', form({ ...good, config: bigRank }), 422, 'adapter_rank_too_large'],
      ['demo-1', form({ ...good, config: wrongShape }), 422, 'adapter_shape_mismatch'],
      ['demo-1', form({ config: good.config }), 400, 'request_invalid'],
      ['.hidden', form(good), 400, 'adapter_id_invalid'],
      ['a..b', form(good), 400, 'adapter_id_invalid'],
    ];
    for (const [id, body, status, code] of cases) {
      const res = await put(id, body);
      assert.equal(res.status, status, `${id} ${code}: ${JSON.stringify(res.json)}`);
      assert.equal((res.json.error as { code: string }).code, code);
    }
    const traversal = await fetch(`${fx.baseUrl}/v1/adapters/..%2F..%2Fetc`, { method: 'PUT', body: form(good) });
    assert.equal(traversal.status, 400);
    assert.equal(((await traversal.json()) as { error: { code: string } }).error.code, 'adapter_id_invalid');
    const noRoute = await fetch(`${fx.baseUrl}/v1/adapters/../x`, { method: 'PUT', body: form(good) });
    assert.equal(noRoute.status, 404);
    assert.ok(((await noRoute.json()) as { error?: { code: string } }).error, 'unknown routes also answer in the OpenAI error shape');
    assert.deepEqual(await listIds(), before);
    const after = (await (await fetch(`${fx.baseUrl}/v1/adapters/demo-1`)).json()) as { version: number };
    assert.equal(after.version, 1);
  });

  test('a stored version whose files were damaged on disk becomes errored: its requests fail with 422, others go on, a re-upload heals it', async () => {
    await put('fragile', form(good));
    const weightsFile = join(fx.gateway.getAdapter('fragile')!.dir, 'adapter_model.safetensors');
    const damaged = await readFile(weightsFile);
    damaged[damaged.length - 1] ^= 0xff;
    await writeFile(weightsFile, damaged);
    const complete = (model: string) => fetch(`${fx.baseUrl}/v1/completions`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ model, prompt: 'hi', max_tokens: 3 }) });
    const [bad, fine] = await Promise.all([complete('fragile'), complete('demo-0')]);
    assert.equal(bad.status, 422);
    assert.equal(((await bad.json()) as { error: { code: string } }).error.code, 'adapter_weights_invalid');
    assert.equal(fine.status, 200);
    const shown = (await (await fetch(`${fx.baseUrl}/v1/adapters/fragile`)).json()) as { residence: string; error?: string };
    assert.equal(shown.residence, 'errored');
    assert.match(shown.error ?? '', /checksums/);
    assert.equal((await complete('fragile')).status, 422, 'it stays errored without being re-read');
    const healed = await put('fragile', form(good));
    assert.equal(healed.json.version, 2);
    assert.notEqual(healed.json.residence, 'errored');
    assert.equal((await complete('fragile')).status, 200);
    await fetch(`${fx.baseUrl}/v1/adapters/fragile`, { method: 'DELETE' });
  });

  test("vLLM's load_lora_adapter and unload_lora_adapter register and remove a folder", async () => {
    const load = await fetch(`${fx.baseUrl}/v1/load_lora_adapter`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ lora_name: 'from-dir', lora_path: join(fx.modelDir, 'adapters', 'demo-0') }),
    });
    assert.equal(load.status, 200);
    assert.ok((await listIds()).includes('from-dir'));
    const unload = await fetch(`${fx.baseUrl}/v1/unload_lora_adapter`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ lora_name: 'from-dir' }),
    });
    assert.equal(unload.status, 200);
    assert.ok(!(await listIds()).includes('from-dir'));
    const bad = await fetch(`${fx.baseUrl}/v1/load_lora_adapter`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: '{}' });
    assert.equal(bad.status, 400);
  });

  test('/health and /ready answer; /metrics is Prometheus text with pool pages by kind', async () => {
    assert.equal((await fetch(`${fx.baseUrl}/health`)).status, 200);
    assert.equal(((await (await fetch(`${fx.baseUrl}/ready`)).json()) as { model: string }).model, 'demo-model');
    const res = await fetch(`${fx.baseUrl}/metrics`);
    assert.match(res.headers.get('content-type') ?? '', /text\/plain/);
    const text = await res.text();
    for (const line of text.split('\n').filter((l) => l && !l.startsWith('#'))) {
      assert.match(line, /^[a-zA-Z_:][a-zA-Z0-9_:]*(\{[^}]*\})? -?[0-9.e+Inf-]+$/, line);
    }
    assert.match(text, /lora_gateway_pool_pages\{kind="capacity"\} \d+/);
    assert.match(text, /# TYPE lora_gateway_adapter_events_total counter/);
    // a counter that tracks the pager's cumulative loads across scrapes
    const loads = (t: string) => Number(/lora_gateway_adapter_events_total\{event="load",tier="device"\} (\d+)/.exec(t)![1]);
    assert.equal(loads(text), fx.gateway.stats().pager.deviceLoads);
    const again = await (await fetch(`${fx.baseUrl}/metrics`)).text();
    assert.equal(loads(again), fx.gateway.stats().pager.deviceLoads, 'a second scrape does not count the same loads twice');
  });

  test('every series the Grafana dashboard queries is exported, the Federation row once federation metrics share the registry', async () => {
    // wired as `serve` does it: FederationMetrics on the gateway metrics' registry, one /metrics
    const metrics = new GatewayMetrics(fx.gateway);
    new FederationMetrics(metrics.registry, { jobsByState: () => ({ queued: 0, running: 1, completed: 0, stopped: 0, failed: 0, cancelled: 0 }), liveClients: () => 2 });
    const app = await buildApp({ engine: fx.gateway, metrics });
    const text = (await app.inject({ method: 'GET', url: '/metrics' })).body;
    await app.close();
    for (const line of text.split('\n').filter((l) => l && !l.startsWith('#'))) {
      assert.match(line, /^[a-zA-Z_:][a-zA-Z0-9_:]*(\{[^}]*\})? -?[0-9.e+Inf-]+$/, line);
    }
    const dashboard = await readFile(new URL('../../grafana/lora-gateway.json', import.meta.url), 'utf8');
    const used = new Set([...dashboard.matchAll(/lora_gateway_[a-z_]+/g)].map((m) => m[0].replace(/_(bucket|sum|count)$/, '')));
    assert.ok(used.size >= 10);
    assert.ok([...used].filter((n) => n.startsWith('lora_gateway_federation_')).length >= 6, 'the dashboard has a Federation row');
    for (const name of used) assert.ok(text.includes(`# TYPE ${name} `), `dashboard metric ${name} is exported`);
    // the panels read label values that the metrics really have
    const selectors = [...dashboard.matchAll(/(lora_gateway_[a-z_]+)\{([a-z_]+)=\\"([a-z_]+)\\"/g)];
    assert.ok(selectors.length >= 5);
    for (const [, name, label, value] of selectors) assert.ok(text.includes(`${label}="${value}"`), `${name}{${label}="${value}"} is exported`);
  });
});
