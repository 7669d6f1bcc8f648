import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { ServerLifecycle } from '../../src/api/server-lifecycle.js';
import { startGateway, type GatewayFixture } from '../helpers/gateway-fixture.js';

let fx: GatewayFixture;
const lifecycle = new ServerLifecycle();
before(async () => {
  fx = await startGateway(1, {}, { lifecycle });
});
after(() => fx.close());

const complete = (body: object) =>
  fetch(`${fx.baseUrl}/v1/completions`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ model: 'demo-model', prompt: 'hi', ...body }) });

describe('draining for shutdown', () => {
  test('running requests go on while draining; new ones get 503 server_shutting_down; /ready turns 503 draining; cancelling ends a stream with that error event', async () => {
    assert.equal((await fetch(`${fx.baseUrl}/ready`)).status, 200);
    const stream = await complete({ max_tokens: 1900, ignore_eos: true, stream: true });
    assert.equal(stream.status, 200);
    const reader = stream.body!.getReader();
    let text = new TextDecoder().decode((await reader.read()).value);
    assert.equal(lifecycle.running, 1);

    lifecycle.beginDrain();
    const ready = await fetch(`${fx.baseUrl}/ready`);
    assert.equal(ready.status, 503);
    assert.deepEqual(((await ready.json()) as { status: string }).status, 'draining');
    assert.equal(ready.headers.get('connection'), 'close');
    assert.equal((await fetch(`${fx.baseUrl}/health`)).status, 200);
    const refused = await complete({ max_tokens: 2 });
    assert.equal(refused.status, 503);
    assert.equal(((await refused.json()) as { error: { code: string } }).error.code, 'server_shutting_down');

    lifecycle.cancelInFlight();
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      text += new TextDecoder().decode(value);
    }
    await lifecycle.whenIdle();
    assert.equal(lifecycle.running, 0);
    const events = text.split('\n\n').filter((e) => e.startsWith('data: '));
    assert.equal(events.at(-1), 'data: [DONE]');
    assert.equal((JSON.parse(events.at(-2)!.slice(6)) as { error: { code: string } }).error.code, 'server_shutting_down');
    assert.equal(fx.gateway.stats().running, 0);
  });
});
