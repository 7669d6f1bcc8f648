import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { after, before, describe, test } from 'node:test';
import { connectRaw, parseRawResponse } from '../helpers/raw-http.js';
import { startGateway, type GatewayFixture } from '../helpers/gateway-fixture.js';

let fx: GatewayFixture;
before(async () => {
  fx = await startGateway(1, {}, { bodyLimitBytes: 8 * 1024 });
});
after(() => fx.close());

// every code the gateway can answer with, as the README's error table and src/errors.ts spell them
const ERROR_CODES = new Set([...readFileSync('src/errors.ts', 'utf8').matchAll(/^\s+\| '([A-Z_]+)'/gm)].map((m) => m[1].toLowerCase()));
const README = readFileSync('README.md', 'utf8');

async function expectError(res: Response, status: number, code: string): Promise<void> {
  assert.equal(res.status, status, `${res.url}: ${res.status}`);
  const body = (await res.json()) as { error: { message: string; type: string; code: string } };
  assert.equal(body.error.code, code);
  assert.ok(ERROR_CODES.has(body.error.code), `${code} is one of src/errors.ts's codes`);
  assert.ok(README.includes(`\`${code}\``), `README lists ${code}`);
  assert.equal(body.error.type, status >= 500 ? 'server_error' : 'invalid_request_error');
  assert.ok(body.error.message.length > 0);
}

const postJson = (path: string, body: string, contentType = 'application/json') => fetch(`${fx.baseUrl}${path}`, { method: 'POST', headers: { 'content-type': contentType }, body });

describe("Fastify's and Node's own errors carry our codes, OpenAI-shaped", () => {
  test('a body that is not JSON, or empty, is 400 json_invalid', async () => {
    await expectError(await postJson('/v1/completions', '{"model": "demo-model", '), 400, 'json_invalid');
    await expectError(await postJson('/v1/completions', ''), 400, 'json_invalid');
  });

  test('a content type no route parses is 415 media_type_unsupported', async () => {
    await expectError(await postJson('/v1/completions', '<prompt/>', 'text/xml'), 415, 'media_type_unsupported');
  });

  test('a body over --body-limit is 413 body_too_large', async () => {
    await expectError(await postJson('/v1/completions', JSON.stringify({ model: 'demo-model', prompt: 'x'.repeat(16 * 1024) })), 413, 'body_too_large');
  });

  test('a 300-character id is 414 url_too_long; a 128-character one (the longest valid id) reaches the route', async () => {
    await expectError(await fetch(`${fx.baseUrl}/v1/models/${'a'.repeat(300)}`), 414, 'url_too_long');
    await expectError(await fetch(`${fx.baseUrl}/v1/models/${'a'.repeat(128)}`), 404, 'adapter_not_found');
  });

  test('a path that is not valid percent-encoding is 400 url_invalid', async () => {
    await expectError(await fetch(`${fx.baseUrl}/v1/models/%zz`), 400, 'url_invalid');
  });

  test('an unknown route is 404 route_not_found; a known one under another method is 405 method_not_allowed with Allow', async () => {
    await expectError(await fetch(`${fx.baseUrl}/v1/nothing-here`), 404, 'route_not_found');
    const res = await fetch(`${fx.baseUrl}/v1/completions`);
    assert.equal(res.headers.get('allow'), 'POST');
    await expectError(res, 405, 'method_not_allowed');
    const param = await fetch(`${fx.baseUrl}/v1/adapters/demo-0/completions`, { method: 'GET' });
    assert.equal(param.headers.get('allow'), 'POST');
    await expectError(param, 405, 'method_not_allowed');
  });

  test('bytes that are not HTTP are 400 request_malformed; oversized headers are 431 headers_too_large', async () => {
    const junk = await connectRaw(fx.baseUrl);
    junk.socket.write('HELLO THERE\r\n\r\n');
    const bad = parseRawResponse(await junk.closed);
    assert.equal(bad.status, 400);
    assert.equal((bad.body as { error: { code: string } }).error.code, 'request_malformed');

    const big = await connectRaw(fx.baseUrl);
    big.socket.write(`GET /health HTTP/1.1\r\nHost: x\r\nX-Big: ${'a'.repeat(64 * 1024)}\r\n\r\n`);
    const huge = parseRawResponse(await big.closed);
    assert.equal(huge.status, 431);
    assert.equal((huge.body as { error: { code: string } }).error.code, 'headers_too_large');
    for (const code of ['request_malformed', 'headers_too_large']) assert.ok(ERROR_CODES.has(code) && README.includes(`\`${code}\``), code);
  });

  test('the server still serves after all of them', async () => {
    const res = await postJson('/v1/completions', JSON.stringify({ model: 'demo-model', prompt: 'hello', max_tokens: 2 }));
    assert.equal(res.status, 200);
  });
});
