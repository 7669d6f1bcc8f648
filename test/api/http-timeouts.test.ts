import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { connectRaw, drip, parseRawResponse } from '../helpers/raw-http.js';
import { startGateway, type GatewayFixture } from '../helpers/gateway-fixture.js';

const HEADER_MS = 400;
const REQUEST_MS = 800;
const KEEP_ALIVE_MS = 400;

let fx: GatewayFixture;
before(async () => {
  fx = await startGateway(1, {}, { timeouts: { headerTimeoutMs: HEADER_MS, requestTimeoutMs: REQUEST_MS, keepAliveTimeoutMs: KEEP_ALIVE_MS } });
});
after(() => fx.close());

function expectTimeout(raw: string): void {
  const res = parseRawResponse(raw);
  assert.equal(res.status, 408, raw);
  assert.equal((res.body as { error: { code: string } }).error.code, 'request_timeout');
}

describe('connection timeouts (--header-timeout, --request-timeout, --keep-alive-timeout)', () => {
  test('a connection that sends nothing is answered 408 request_timeout and closed', async () => {
    const c = await connectRaw(fx.baseUrl);
    expectTimeout(await c.closed);
  });

  test('headers dripped one byte at a time are cut at the header timeout', async () => {
    const c = await connectRaw(fx.baseUrl);
    // 300 bytes at one per 20 ms would take 6 s
    const stop = drip(c.socket, `GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ${'a'.repeat(260)}\r\n\r\n`, 20);
    expectTimeout(await c.closed);
    stop();
  });

  test('a body dripped after complete headers is cut at the request timeout', async () => {
    const c = await connectRaw(fx.baseUrl);
    c.socket.write('POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 400\r\n\r\n');
    const stop = drip(c.socket, ' '.repeat(400), 20);
    expectTimeout(await c.closed);
    stop();
  });

  test('an idle keep-alive connection is closed after its response', async () => {
    const c = await connectRaw(fx.baseUrl);
    c.socket.write('GET /health HTTP/1.1\r\nHost: x\r\n\r\n');
    const raw = await c.closed;
    assert.equal(parseRawResponse(raw).status, 200);
    assert.match(raw, /keep-alive: timeout=/i);
  });

  test('a stream that lasts longer than the request timeout runs to its end', async () => {
    const started = performance.now();
    const res = await fetch(`${fx.baseUrl}/v1/completions`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ model: 'demo-model', prompt: 'go on', max_tokens: 1500, ignore_eos: true, stream: true, logprobs: 5 }),
    });
    assert.equal(res.status, 200);
    const text = await res.text();
    const elapsed = performance.now() - started;
    assert.ok(elapsed > REQUEST_MS, `precondition: the stream must outlast the request timeout (${elapsed.toFixed(0)} ms)`);
    assert.match(text, /"finish_reason":"length"/);
    assert.ok(text.endsWith('data: [DONE]\n\n'));
  });
});
