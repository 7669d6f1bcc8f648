import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { readdir } from 'node:fs/promises';

const sha256 = (b: ArrayBuffer) => createHash('sha256').update(Buffer.from(b)).digest('hex');

interface VersionJson {
  version: number;
  sha256: { config: string; weights: string };
}

/**
 * Asserts an adapter id is whole as the API shows it: its latest version is the last of its
 * versions, and every listed version's two files download with the sha256 its manifest records.
 * Returns the latest version.
 */
export async function assertAdapterWhole(baseUrl: string, id: string): Promise<number> {
  const shown = (await (await fetch(`${baseUrl}/v1/adapters/${id}`)).json()) as { version: number };
  const versions = ((await (await fetch(`${baseUrl}/v1/adapters/${id}/versions`)).json()) as { data: VersionJson[] }).data;
  assert.equal(versions.at(-1)?.version, shown.version, `${id}: the latest version is the last listed`);
  for (const v of versions) {
    for (const [file, want] of [['adapter_config.json', v.sha256.config], ['adapter_model.safetensors', v.sha256.weights]] as const) {
      const res = await fetch(`${baseUrl}/v1/adapters/${id}/files/${file}?version=${v.version}`);
      assert.equal(res.status, 200, `${id} v${v.version} ${file}`);
      assert.equal(sha256(await res.arrayBuffer()), want, `${id} v${v.version} ${file} matches its manifest`);
    }
  }
  return shown.version;
}

/** Asserts no temporary folder of an interrupted or failed write is left in a store folder. */
export async function assertNoTempLeft(storeDir: string): Promise<void> {
  const left = (await readdir(storeDir)).filter((n) => n.startsWith('.tmp-'));
  assert.deepEqual(left, [], `temporary folders left in ${storeDir}`);
}

/** POST /v1/completions on a model; returns the status. */
export async function completionStatus(baseUrl: string, model: string): Promise<number> {
  const res = await fetch(`${baseUrl}/v1/completions`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ model, prompt: 'hello', max_tokens: 2 }) });
  await res.arrayBuffer();
  return res.status;
}
