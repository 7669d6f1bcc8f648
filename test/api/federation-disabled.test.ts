import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { startGateway, type GatewayFixture } from '../helpers/gateway-fixture.js';

let fx: GatewayFixture;
before(async () => {
  fx = await startGateway(1);
});
after(async () => fx.close());

test('without --redis every federation route answers 503 federation_disabled, saying how to turn it on', async () => {
  const routes: [string, string][] = [
    ['POST', '/v1/federation/jobs'],
    ['GET', '/v1/federation/jobs'],
    ['GET', '/v1/federation/jobs/fj-1'],
    ['POST', '/v1/federation/jobs/fj-1/cancel'],
    ['GET', '/v1/federation/clients'],
    ['GET', '/v1/federation/jobs/fj-1/rounds/1/updates/a'],
    ['GET', '/v1/federation/jobs/fj-1/rounds/1/global'],
  ];
  for (const [method, path] of routes) {
    const res = await fetch(`${fx.baseUrl}${path}`, { method, headers: method === 'POST' ? { 'content-type': 'application/json' } : {}, body: method === 'POST' ? '{"method":"ffa"}' : undefined });
    assert.equal(res.status, 503, `${method} ${path}`);
    const body = (await res.json()) as { error: { code: string; message: string } };
    assert.equal(body.error.code, 'federation_disabled');
    assert.match(body.error.message, /--redis/);
  }
  // serving is unaffected
  const ok = await fetch(`${fx.baseUrl}/v1/completions`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ model: 'demo-0', prompt: 'Hi', max_tokens: 1 }) });
  assert.equal(ok.status, 200);
});
