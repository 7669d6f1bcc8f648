import assert from 'node:assert/strict';
import { mkdir, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { readPeftAdapter } from '../../src/model/lora/peft-adapter-reader.js';
import type { AdapterFiles } from '../../src/pager/adapter-store.js';
import { startGateway, type GatewayFixture } from '../helpers/gateway-fixture.js';

let fx: GatewayFixture;
/** demo-0 and demo-1's files: uploaded as versions 1 and 2 of 'dl'. */
const uploads: AdapterFiles[] = [];

async function filesOf(name: string): Promise<AdapterFiles> {
  const dir = join(fx.modelDir, 'adapters', name);
  return { config: await readFile(join(dir, 'adapter_config.json')), weights: await readFile(join(dir, 'adapter_model.safetensors')) };
}

function form(files: AdapterFiles): FormData {
  const f = new FormData();
  f.append('adapter_config.json', new Blob([new Uint8Array(files.config)]), 'adapter_config.json');
  f.append('adapter_model.safetensors', new Blob([new Uint8Array(files.weights)]), 'adapter_model.safetensors');
  return f;
}

async function download(id: string, file: string, version?: string): Promise<Response> {
  const query = version === undefined ? '' : `?version=${encodeURIComponent(version)}`;
  return fetch(`${fx.baseUrl}/v1/adapters/${encodeURIComponent(id)}/files/${encodeURIComponent(file)}${query}`);
}

async function errorOf(res: Response): Promise<{ code: string; message: string }> {
  return ((await res.json()) as { error: { code: string; message: string } }).error;
}

before(async () => {
  fx = await startGateway(2);
  for (const name of ['demo-0', 'demo-1']) {
    const files = await filesOf(name);
    uploads.push(files);
    const res = await fetch(`${fx.baseUrl}/v1/adapters/dl`, { method: 'PUT', body: form(files) });
    assert.ok(res.status === 201 || res.status === 200, `upload ${name}: ${res.status}`);
  }
});
after(() => fx.close());

describe('GET /v1/adapters/{id}/files/{file}', () => {
  test('downloads each version by number and the latest without one: same bytes, headers, and PEFT-loadable', async () => {
    const cases: [string | undefined, number][] = [['1', 1], ['2', 2], [undefined, 2]];
    for (const [query, version] of cases) {
      const config = await download('dl', 'adapter_config.json', query);
      assert.equal(config.status, 200);
      assert.match(config.headers.get('content-type') ?? '', /^application\/json/);
      assert.equal(config.headers.get('content-disposition'), 'attachment; filename="adapter_config.json"');
      assert.equal(config.headers.get('x-adapter-version'), String(version));
      const configBytes = Buffer.from(await config.arrayBuffer());
      assert.ok(configBytes.equals(uploads[version - 1].config), `config of version ${version}`);

      const weights = await download('dl', 'adapter_model.safetensors', query);
      assert.equal(weights.status, 200);
      assert.equal(weights.headers.get('content-type'), 'application/octet-stream');
      assert.equal(weights.headers.get('content-disposition'), 'attachment; filename="adapter_model.safetensors"');
      assert.equal(weights.headers.get('x-adapter-version'), String(version));
      const weightsBytes = Buffer.from(await weights.arrayBuffer());
      assert.ok(weightsBytes.equals(uploads[version - 1].weights), `weights of version ${version}`);

      // what was downloaded is a PEFT adapter folder again
      const dir = join(fx.modelDir, 'downloaded', `v${version}-${query ?? 'latest'}`);
      await mkdir(dir, { recursive: true });
      await writeFile(join(dir, 'adapter_config.json'), configBytes);
      await writeFile(join(dir, 'adapter_model.safetensors'), weightsBytes);
      const host = await readPeftAdapter(dir, fx.gateway.model, 64);
      const original = await readPeftAdapter(join(fx.modelDir, 'adapters', `demo-${version - 1}`), fx.gateway.model, 64);
      assert.deepEqual(host.modules.map((m) => [m.spec.proj, m.spec.layer, m.spec.rank]), original.modules.map((m) => [m.spec.proj, m.spec.layer, m.spec.rank]));
      assert.deepEqual(host.modules[0].a, original.modules[0].a);
    }
  });

  test('a missing id or version is 404 adapter_not_found naming which; another file name or a bad version is 400', async () => {
    const noId = await download('no-such', 'adapter_config.json');
    assert.equal(noId.status, 404);
    const e1 = await errorOf(noId);
    assert.equal(e1.code, 'adapter_not_found');
    assert.match(e1.message, /adapter 'no-such' does not exist/);

    const noIdVersion = await download('no-such', 'adapter_config.json', '1');
    assert.equal(noIdVersion.status, 404);
    assert.match((await errorOf(noIdVersion)).message, /adapter 'no-such' does not exist/);

    const noVersion = await download('dl', 'adapter_model.safetensors', '3');
    assert.equal(noVersion.status, 404);
    const e2 = await errorOf(noVersion);
    assert.equal(e2.code, 'adapter_not_found');
    assert.match(e2.message, /no version 3 \(latest is 2\)/);

    for (const file of ['manifest.json', '../v1/manifest.json', 'adapter_model.bin', 'adapter_config.json.bak', 'constructor']) {
      const res = await download('dl', file);
      assert.equal(res.status, 400, file);
      const e = await errorOf(res);
      assert.equal(e.code, 'request_invalid', file);
      assert.match(e.message, /adapter_config\.json or adapter_model\.safetensors/, file);
    }
    for (const version of ['0', '-1', '1.5', 'abc', '', '1e3']) {
      const res = await download('dl', 'adapter_config.json', version);
      assert.equal(res.status, 400, `version=${version}`);
      assert.equal((await errorOf(res)).code, 'request_invalid', `version=${version}`);
    }
    const badId = await download('a..b', 'adapter_config.json');
    assert.equal(badId.status, 400);
    assert.equal((await errorOf(badId)).code, 'adapter_id_invalid');
  });

  test('a file damaged on disk is refused (422) rather than served', async () => {
    const record = await fx.gateway.putAdapter('damaged', uploads[0]);
    const file = join(record.dir, 'adapter_config.json');
    await writeFile(file, Buffer.concat([uploads[0].config, Buffer.from('\n')]));
    const res = await download('damaged', 'adapter_config.json');
    assert.equal(res.status, 422);
    assert.equal((await errorOf(res)).code, 'adapter_weights_invalid');
  });
});

describe('provenance in the adapter JSON', () => {
  test('GET /v1/adapters/{id} and the list show provenance when a version has it, and omit it otherwise', async () => {
    const provenance = { job: 'job-7', round: 4, method: 'fedavg', clients: 3, examples: 96 };
    await fx.gateway.putAdapter('fed', uploads[1], { provenance });
    const one = (await (await fetch(`${fx.baseUrl}/v1/adapters/fed`)).json()) as Record<string, unknown>;
    assert.deepEqual(one.provenance, provenance);
    const list = (await (await fetch(`${fx.baseUrl}/v1/adapters`)).json()) as { data: Record<string, unknown>[] };
    assert.deepEqual(list.data.find((a) => a.id === 'fed')?.provenance, provenance);
    const plain = list.data.find((a) => a.id === 'dl');
    assert.ok(plain);
    assert.ok(!('provenance' in plain), 'an uploaded adapter has no provenance');
    // the version federation published can be downloaded like any other
    const res = await download('fed', 'adapter_model.safetensors');
    assert.equal(res.status, 200);
    assert.ok(Buffer.from(await res.arrayBuffer()).equals(uploads[1].weights));
  });
});
