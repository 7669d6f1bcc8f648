import assert from 'node:assert/strict';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { demoModelConfigJson } from '../../src/cli/demo-model-command.js';
import { parseModelConfig } from '../../src/model/architecture/model-config.js';
import { resolvePeftConfig } from '../../src/model/lora/peft-config.js';
import { adapterPages, kvPagesPerToken, pageBytes } from '../../src/pager/page-sizes.js';
import { startGateway, type GatewayFixture } from '../helpers/gateway-fixture.js';

const ADAPTERS = 1000;
let fx: GatewayFixture;

before(async () => {
  // budget: 20 of the largest adapters registered below (demo-3: rank 32 on q_proj, v_proj) plus KV for 8 requests
  const config = parseModelConfig(demoModelConfigJson());
  const biggest = adapterPages(config, resolvePeftConfig({ r: 32, lora_alpha: 64, target_modules: ['q_proj', 'v_proj'] }, config, 64));
  const pages = 20 * biggest + 8 * kvPagesPerToken(config) * 64;
  fx = await startGateway(4, { deviceMemoryBytes: pages * pageBytes(config), limits: { maxRunningSeqs: 8, maxBatchTokens: 512, maxAdaptersPerBatch: 8, maxWaiting: 2000 } });
  const src = join(fx.modelDir, 'adapters');
  const files = await Promise.all([0, 1, 2, 3].map(async (i) => ({
    config: await readFile(join(src, `demo-${i}`, 'adapter_config.json')),
    weights: await readFile(join(src, `demo-${i}`, 'adapter_model.safetensors')),
  })));
  for (let i = 4; i < ADAPTERS; i++) await fx.gateway.putAdapter(`demo-${i}`, files[i % 4]);
});
after(() => fx?.close());

test('1,000 registered adapters with a device budget for 20 serve requests spread over all of them', async () => {
  assert.equal(fx.gateway.listAdapters().length, ADAPTERS);
  const ids = Array.from({ length: 60 }, (_, i) => `demo-${(i * 367) % ADAPTERS}`);
  const responses = await Promise.all(
    ids.map(async (model, i) => {
      const res = await fetch(`${fx.baseUrl}/v1/completions`, {
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        body: JSON.stringify({ model, prompt: `request ${i}`, max_tokens: 4, temperature: 0, ignore_eos: true }),
      });
      return { status: res.status, body: (await res.json()) as { usage?: { completion_tokens: number } } };
    }),
  );
  for (const r of responses) {
    assert.equal(r.status, 200);
    assert.equal(r.body.usage?.completion_tokens, 4);
  }
  const stats = fx.gateway.stats();
  assert.ok(stats.pager.deviceEvictions > 0, 'adapters were paged out to make room');
  assert.ok(stats.pages.kv + stats.pages.adapter <= stats.pages.capacity);
  assert.equal(stats.pages.kv, 0);
});
