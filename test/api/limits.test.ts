import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { startGateway, type GatewayFixture } from '../helpers/gateway-fixture.js';

let fx: GatewayFixture;

before(async () => {
  // one running sequence and one waiting slot, so a third concurrent request overflows the queue
  fx = await startGateway(1, { limits: { maxRunningSeqs: 1, maxBatchTokens: 2048, maxAdaptersPerBatch: 4, maxWaiting: 1 } }, { bodyLimitBytes: 64 * 1024 });
});
after(() => fx.close());

const post = (path: string, body: string) => fetch(`${fx.baseUrl}${path}`, { method: 'POST', headers: { 'content-type': 'application/json' }, body });

describe('HTTP limits', () => {
  test('a body over the limit gets 413 with an OpenAI-shaped error, and the server keeps serving', async () => {
    const res = await post('/v1/completions', JSON.stringify({ model: 'demo-model', prompt: 'x'.repeat(100 * 1024), max_tokens: 1 }));
    assert.equal(res.status, 413);
    const body = (await res.json()) as { error: { message: string; code: string; type: string } };
    assert.equal(typeof body.error.message, 'string');
    assert.equal(typeof body.error.code, 'string');
    const ok = await post('/v1/completions', JSON.stringify({ model: 'demo-model', prompt: 'hello', max_tokens: 2 }));
    assert.equal(ok.status, 200);
  });

  test('an upload whose file exceeds the limit gets 413 and stores nothing', async () => {
    const form = new FormData();
    form.append('adapter_config.json', new Blob(['{}']), 'adapter_config.json');
    form.append('adapter_model.safetensors', new Blob([new Uint8Array(128 * 1024)]), 'adapter_model.safetensors');
    const res = await fetch(`${fx.baseUrl}/v1/adapters/too-big`, { method: 'PUT', body: form });
    assert.equal(res.status, 413);
    assert.ok(((await res.json()) as { error?: unknown }).error);
    assert.equal((await fetch(`${fx.baseUrl}/v1/adapters/too-big`)).status, 404);
  });

  test('when the waiting queue is full, requests get 429 with Retry-After; the running and waiting ones complete', async () => {
    // a long streaming request occupies the only running slot while the others arrive
    const ctrl = new AbortController();
    const running = await fetch(`${fx.baseUrl}/v1/completions`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ model: 'demo-0', prompt: 'hold the slot', max_tokens: 400, temperature: 0, ignore_eos: true, stream: true }),
      signal: ctrl.signal,
    });
    const reader = running.body!.getReader();
    await reader.read();
    // ignore_eos: the count below is about the queue, not about where this random model stops
    const waiting = post('/v1/completions', JSON.stringify({ model: 'demo-model', prompt: 'second', max_tokens: 3, ignore_eos: true }));
    // give the second request time to be queued before the overflow arrives
    await new Promise((r) => setTimeout(r, 50));
    const overflow = await Promise.all(Array.from({ length: 3 }, () => post('/v1/completions', JSON.stringify({ model: 'demo-model', prompt: 'third', max_tokens: 3 }))));
    const refused = overflow.filter((r) => r.status === 429);
    assert.ok(refused.length >= 1, `statuses: ${overflow.map((r) => r.status).join(', ')}`);
    for (const r of refused) {
      assert.ok(Number(r.headers.get('retry-after')) >= 1);
      assert.equal(((await r.json()) as { error: { code: string } }).error.code, 'queue_full');
    }
    // the client of the long request goes away: its slot frees and the queued request runs
    ctrl.abort();
    await reader.cancel().catch(() => undefined);
    const second = await waiting;
    assert.equal(second.status, 200);
    assert.equal(((await second.json()) as { usage: { completion_tokens: number } }).usage.completion_tokens, 3);
    await Promise.all(overflow.filter((r) => r.status !== 429).map((r) => r.text()));
  });
});
