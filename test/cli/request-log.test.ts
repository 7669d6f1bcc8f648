import assert from 'node:assert/strict';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, test } from 'node:test';
import { createLogger, humanLine } from '../../src/api/request-log.js';
import { startServe, type LogEntry } from '../helpers/serve-process.js';

const dirs: string[] = [];
after(async () => Promise.all(dirs.map((d) => rm(d, { recursive: true, force: true }))));
const tempDir = async () => {
  const d = await mkdtemp(join(tmpdir(), 'lora-gateway-log-'));
  dirs.push(d);
  return d;
};

const SECRET = 'sk-test-0123456789abcdef';
const version = (JSON.parse(await readFile(new URL('../../package.json', import.meta.url), 'utf8')) as { version: string }).version;

/** Startup must say which backend runs and, when it is not native TensorFlow, why and how to get it. */
function assertBackendExplained(text: string): void {
  const backend = /tensor backend: (\w+)/.exec(text)?.[1];
  assert.ok(backend, text);
  if (backend !== 'tensorflow') {
    assert.match(text, /native TensorFlow backend not loaded: @tensorflow\/tfjs-node-gpu: \S.*; @tensorflow\/tfjs-node: \S.*; to use it: npm install @tensorflow\/tfjs-node/);
  }
}

test('serve logs one JSON line per request on stdout (id, route, adapter, status, tokens, latency), never the API key; /metrics counts every route', async () => {
  const server = await startServe(['--data', await tempDir(), '--port', '0', '--backend', 'auto']);
  try {
    assertBackendExplained(server.text());
    const headers = { 'content-type': 'application/json', authorization: `Bearer ${SECRET}` };
    const res = await fetch(`${server.url}/v1/completions`, { method: 'POST', headers, body: JSON.stringify({ model: 'demo-1', prompt: 'The quick brown fox', max_tokens: 5, ignore_eos: true }) });
    assert.equal(res.status, 200);
    const usage = ((await res.json()) as { usage: { prompt_tokens: number; completion_tokens: number } }).usage;
    const missingAdapter = await fetch(`${server.url}/v1/completions`, { method: 'POST', headers, body: JSON.stringify({ model: 'no-such-adapter', prompt: 'x', max_tokens: 1 }) });
    assert.equal(missingAdapter.status, 404);
    assert.equal((await fetch(`${server.url}/v1/no/such/route?x=1`, { headers })).status, 404);
    // errors Fastify raises before routing are OpenAI-shaped too
    const badUrl = await fetch(`${server.url}/v1/models/%E0%A4%A`);
    assert.equal(badUrl.status, 400);
    assert.equal(((await badUrl.json()) as { error: { code: string } }).error.code, 'url_invalid');
    const ready = (await (await fetch(`${server.url}/ready`)).json()) as Record<string, unknown>;
    assert.deepEqual(Object.keys(ready).sort(), ['backend', 'model', 'native_blas', 'status', 'version']);
    assert.equal(ready.version, version);
    assert.match(String(ready.backend), /^(wasm|tensorflow|cpu)$/);
    assert.match(server.text(), new RegExp(`tensor backend: ${ready.backend} `), '/ready names the backend the engine thread resolved');

    const requests = () => server.entries.filter((e) => e.msg === 'request');
    await server.waitFor((e) => e.msg === 'request' && e.route === '/ready');
    const [completion, notFound, unmatched] = requests();
    assert.deepEqual(
      { ...completion, reqId: undefined, latencyMs: undefined, time: undefined, pid: undefined, hostname: undefined },
      { level: 30, msg: 'request', reqId: undefined, method: 'POST', route: '/v1/completions', adapter: 'demo-1', status: 200, promptTokens: usage.prompt_tokens, generatedTokens: usage.completion_tokens, latencyMs: undefined, time: undefined, pid: undefined, hostname: undefined },
    );
    assert.equal(usage.completion_tokens, 5);
    assert.equal(typeof completion.reqId, 'string');
    assert.ok(typeof completion.latencyMs === 'number' && completion.latencyMs >= 0);
    assert.equal(notFound.adapter, 'no-such-adapter');
    assert.equal(notFound.status, 404);
    assert.equal(notFound.generatedTokens, undefined, 'a request refused before it ran generated nothing');
    assert.deepEqual([unmatched.route, unmatched.url, unmatched.status, unmatched.adapter], ['unmatched', '/v1/no/such/route?x=1', 404, undefined]);
    assert.equal(new Set(requests().map((e) => e.reqId)).size, requests().length, 'each request has its own id');
    // Fastify's own pair of lines per request is off
    assert.equal(server.entries.filter((e) => e.msg === 'incoming request' || e.msg === 'request completed').length, 0);

    const metrics = await (await fetch(`${server.url}/metrics`)).text();
    assert.match(metrics, /lora_gateway_requests_total\{route="completions",status="200"\} 1\n/);
    assert.match(metrics, /lora_gateway_requests_total\{route="completions",status="404"\} 1\n/);
    assert.match(metrics, /lora_gateway_requests_total\{route="unmatched",status="404"\} 1\n/);
    assert.match(metrics, /lora_gateway_requests_total\{route="GET \/ready",status="200"\} 1\n/);
    assert.ok(!metrics.includes('/v1/no/such/route'), 'an unmatched URL never becomes a label value');
    assert.match(metrics, new RegExp(`lora_gateway_build_info\\{version="${version.replace(/\./g, '\\.')}",backend="${ready.backend}",native_blas="${ready.native_blas}",node="${process.versions.node}"\\} 1`));
    await server.waitFor((e) => e.msg === 'request' && e.route === '/metrics');
    assert.ok(!JSON.stringify(server.entries).includes(SECRET), 'the API key is never logged');
  } finally {
    await server.stop();
  }
});

test('with --engine-thread off the startup log also says which backend runs and why native TensorFlow did not load', async () => {
  const server = await startServe(['--data', await tempDir(), '--port', '0', '--backend', 'auto', '--engine-thread', 'off']);
  try {
    assertBackendExplained(server.text());
    assert.match(server.text(), /engine: on the HTTP thread/);
  } finally {
    await server.stop();
  }
});

test('the logger honours its level, redacts authorization headers, and writes one readable line per entry for a terminal', () => {
  const lines: string[] = [];
  const sink = { write: (l: string) => lines.push(l) };
  const json = createLogger({ level: 'warn', json: true, destination: sink });
  json.info('dropped');
  json.warn({ req: { headers: { authorization: `Bearer ${SECRET}`, 'x-api-key': SECRET } } }, 'kept');
  assert.equal(lines.length, 1);
  const entry = JSON.parse(lines[0]) as LogEntry;
  assert.equal(entry.msg, 'kept');
  assert.deepEqual(entry.req, { headers: { authorization: '[redacted]', 'x-api-key': '[redacted]' } });

  const human: string[] = [];
  const tty = createLogger({ level: 'info', json: false, destination: { write: (l: string) => human.push(l) } });
  tty.info({ route: '/v1/completions', status: 200, adapter: 'demo-1' }, 'request');
  assert.equal(human.length, 1);
  assert.match(human[0], /^\d\d:\d\d:\d\d\.\d{3} INFO {2}request route=\/v1\/completions status=200 adapter=demo-1\n$/);
  assert.doesNotMatch(human[0], /pid=|hostname=/);
  assert.equal(humanLine('not json\n'), 'not json\n');
});
