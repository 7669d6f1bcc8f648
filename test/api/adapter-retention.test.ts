import assert from 'node:assert/strict';
import { readdir, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { startGateway, type GatewayFixture } from '../helpers/gateway-fixture.js';

let fx: GatewayFixture;
let upload: () => FormData;

before(async () => {
  fx = await startGateway(1, { keepVersions: 1 });
  const dir = join(fx.modelDir, 'adapters', 'demo-0');
  const config = await readFile(join(dir, 'adapter_config.json'));
  const weights = await readFile(join(dir, 'adapter_model.safetensors'));
  upload = () => {
    const f = new FormData();
    f.append('adapter_config.json', new Blob([new Uint8Array(config)]), 'adapter_config.json');
    f.append('adapter_model.safetensors', new Blob([new Uint8Array(weights)]), 'adapter_model.safetensors');
    return f;
  };
});
after(() => fx.close());

const versions = async () => ((await (await fetch(`${fx.baseUrl}/v1/adapters/demo-0/versions`)).json()) as { data: { version: number }[] }).data.map((v) => v.version);
const download = (v: number) => fetch(`${fx.baseUrl}/v1/adapters/demo-0/files/adapter_model.safetensors?version=${v}`);
/** The fixture's store is `<root>/store`, next to its model folder. */
const onDisk = async () => (await readdir(join(fx.modelDir, '..', 'store', 'demo-0'))).sort();

describe('--keep-versions over HTTP', () => {
  test('with keep 1, a request running on v1 finishes while v2 and v3 are uploaded; v2 goes at once, v1 once the request is over', async () => {
    // a long stream on v1: it is still decoding while the two uploads below land
    const res = await fetch(`${fx.baseUrl}/v1/completions`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ model: 'demo-0', prompt: 'The quick brown fox', max_tokens: 1500, ignore_eos: true, stream: true }),
    });
    assert.equal(res.status, 200);
    const reader = res.body!.getReader();
    assert.equal((await reader.read()).done, false, 'the first token arrived: the request runs on v1');

    for (const want of [2, 3]) {
      const put = await fetch(`${fx.baseUrl}/v1/adapters/demo-0`, { method: 'PUT', body: upload() });
      assert.equal(put.status, 200);
      assert.equal(((await put.json()) as { version: number }).version, want);
    }
    assert.deepEqual(await versions(), [1, 3], 'v1 is spared while its request runs; v2 was never used');
    assert.deepEqual(await onDisk(), ['v1', 'v3']);
    const v2 = await download(2);
    assert.equal(v2.status, 404);
    assert.equal(((await v2.json()) as { error: { code: string } }).error.code, 'adapter_not_found');

    let text = '';
    for (let chunk = await reader.read(); !chunk.done; chunk = await reader.read()) text += new TextDecoder().decode(chunk.value);
    const events = text.split('\n\n').filter((e) => e.startsWith('data: {'));
    assert.equal(JSON.parse(events.at(-1)!.slice(6)).choices[0].finish_reason, 'length', 'the request on v1 ran to max_tokens');
    assert.match(text, /data: \[DONE\]\n\n$/);

    assert.deepEqual(await versions(), [3]);
    assert.deepEqual(await onDisk(), ['v3']);
    assert.equal((await download(1)).status, 404);
    assert.equal((await download(3)).status, 200);
    // requests go on to the kept version
    const after = await fetch(`${fx.baseUrl}/v1/completions`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ model: 'demo-0', prompt: 'hi', max_tokens: 2 }) });
    assert.equal(after.status, 200);
    assert.equal(fx.gateway.residence({ ...fx.gateway.getAdapter('demo-0')!, version: 1 }), 'disk', 'v1 left host and device memory too');
  });
});
