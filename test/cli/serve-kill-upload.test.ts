import assert from 'node:assert/strict';
import { request } from 'node:http';
import { mkdir, mkdtemp, readdir, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { assertAdapterWhole, assertNoTempLeft, completionStatus } from '../helpers/adapter-integrity.js';
import { bigDemoAdapter, putAdapter, readAdapterFolder, type AdapterFileBytes } from '../helpers/adapter-upload.js';
import { spawnCli, type CliProcess } from '../helpers/federation-fixture.js';

let data: string;
let serve: CliProcess | undefined;

before(async () => {
  data = await mkdtemp(join(tmpdir(), 'lora-gateway-kill-'));
});
after(async () => {
  await serve?.stop('SIGKILL');
  await rm(data, { recursive: true, force: true });
});

/** `serve` on the data folder (the demo model is created there on the first start). */
async function startServe(): Promise<string> {
  serve = spawnCli(['serve', '--data', data, '--port', '0', '--backend', 'wasm']);
  return (await serve.waitFor(/ at (http:\/\/\S+) \(device pool/, 180_000))[1];
}

async function kill(): Promise<void> {
  serve!.child.kill('SIGKILL');
  await serve!.stop();
}

/** A PUT multipart body of the two files, by hand, so that it can be sent in pieces. */
function multipart(files: AdapterFileBytes): { body: Buffer; contentType: string } {
  const boundary = 'killtest0123456789';
  const part = (name: string, data: Buffer) =>
    Buffer.concat([Buffer.from(`--${boundary}\r\ncontent-disposition: form-data; name="${name}"; filename="${name}"\r\ncontent-type: application/octet-stream\r\n\r\n`), data, Buffer.from('\r\n')]);
  const body = Buffer.concat([part('adapter_config.json', files.config), part('adapter_model.safetensors', files.weights), Buffer.from(`--${boundary}--\r\n`)]);
  return { body, contentType: `multipart/form-data; boundary=${boundary}` };
}

/**
 * Starts a PUT and SIGKILLs the server once `upTo` bytes of its body are handed to the socket:
 * part of it (the body is in flight), or all of it (the server is validating or writing).
 */
async function killDuringUpload(url: string, id: string, files: AdapterFileBytes, upTo: number): Promise<void> {
  const { body, contentType } = multipart(files);
  const req = request(`${url}/v1/adapters/${id}`, { method: 'PUT', headers: { 'content-type': contentType, 'content-length': body.length } });
  const settled = new Promise<void>((resolve) => {
    req.on('error', () => resolve());
    req.on('response', (res) => res.resume().on('end', resolve).on('error', resolve));
  });
  await new Promise<void>((resolve) => req.write(body.subarray(0, upTo), () => resolve()));
  await kill();
  req.destroy();
  await settled;
}

test('SIGKILL during an adapter upload, then a restart on the same data folder: the store is intact, no partial version is ever visible', async () => {
  let url = await startServe();
  const good = await readAdapterFolder(join(data, 'demo-model', 'adapters', 'demo-1'));
  assert.equal((await putAdapter(url, 'victim', good)).status, 201);
  const big = bigDemoAdapter(3);

  // 1. killed with half of the weights in flight: version 2 can never have been stored
  await killDuringUpload(url, 'victim', big, Math.floor(multipart(big).body.length / 2));
  url = await startServe();
  assert.equal(await assertAdapterWhole(url, 'victim'), 1);
  assert.equal(await completionStatus(url, 'victim'), 200);

  // 2. killed the moment the whole body is out: validation, the write or the rename may be under way
  await killDuringUpload(url, 'victim', big, multipart(big).body.length);
  // and what an interrupted write leaves, at its worst: a half-written temporary folder, and a
  // version folder without its manifest (the manifest is written last, inside the temporary folder)
  const store = join(data, 'adapters');
  await mkdir(join(store, '.tmp-00deadbeef00dead'));
  await writeFile(join(store, '.tmp-00deadbeef00dead', 'adapter_model.safetensors'), big.weights.subarray(0, 1000));
  await mkdir(join(store, 'victim', 'v7'));
  await writeFile(join(store, 'victim', 'v7', 'adapter_config.json'), big.config);
  url = await startServe();
  const version = await assertAdapterWhole(url, 'victim');
  assert.ok(version === 1 || version === 2, `version ${version}: the killed upload either landed whole or not at all`);
  assert.equal(await completionStatus(url, 'victim'), 200);
  await assertNoTempLeft(store);
  const listed = ((await (await fetch(`${url}/v1/adapters/victim/versions`)).json()) as { data: { version: number }[] }).data.map((v) => v.version);
  assert.ok(!listed.includes(7), 'a version folder without a manifest is never listed');
  // every other adapter is untouched, and the next upload lands past the orphan folder
  for (const id of ['demo-0', 'demo-1', 'demo-2', 'demo-3']) assert.equal(await assertAdapterWhole(url, id), 1);
  const next = await putAdapter(url, 'victim', big);
  assert.equal(next.status, 200, JSON.stringify(next.json));
  assert.equal(next.json.version, 8);
  assert.equal(await completionStatus(url, 'victim'), 200);
  assert.ok((await readdir(join(store, 'victim'))).includes('v8'));
});
