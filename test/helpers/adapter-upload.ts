import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { demoModelConfigJson } from '../../src/cli/demo-model-command.js';
import { parseModelConfig } from '../../src/model/architecture/model-config.js';
import { encodeSafetensors } from '../../src/model/formats/safetensors.js';
import { resolvePeftConfig } from '../../src/model/lora/peft-config.js';
import { peftConfigJson } from '../../src/model/synthetic/hf-folder-writer.js';
import { randomLoraWeights } from '../../src/model/synthetic/random-weights.js';

export interface AdapterFileBytes {
  config: Buffer;
  weights: Buffer;
}

/** The two files of a PEFT adapter folder. */
export async function readAdapterFolder(dir: string): Promise<AdapterFileBytes> {
  return { config: await readFile(join(dir, 'adapter_config.json')), weights: await readFile(join(dir, 'adapter_model.safetensors')) };
}

/** The multipart body of PUT /v1/adapters/{id}; a file left undefined is left out. */
export function adapterForm(files: { config?: Buffer | string; weights?: Buffer }): FormData {
  const f = new FormData();
  const blob = (b: Buffer | string) => new Blob([typeof b === 'string' ? b : new Uint8Array(b)]);
  if (files.config !== undefined) f.append('adapter_config.json', blob(files.config), 'adapter_config.json');
  if (files.weights !== undefined) f.append('adapter_model.safetensors', blob(files.weights), 'adapter_model.safetensors');
  return f;
}

export interface JsonAnswer {
  status: number;
  json: Record<string, unknown> & { error?: { code: string; message: string; type: string } };
}

export async function putAdapter(baseUrl: string, id: string, files: { config?: Buffer | string; weights?: Buffer }): Promise<JsonAnswer> {
  const res = await fetch(`${baseUrl}/v1/adapters/${encodeURIComponent(id)}`, { method: 'PUT', body: adapterForm(files) });
  return { status: res.status, json: (await res.json()) as JsonAnswer['json'] };
}

export async function postJson(baseUrl: string, path: string, body: unknown): Promise<JsonAnswer> {
  const res = await fetch(`${baseUrl}${path}`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: typeof body === 'string' ? body : JSON.stringify(body) });
  const text = await res.text();
  let json: JsonAnswer['json'];
  try {
    json = JSON.parse(text) as JsonAnswer['json'];
  } catch {
    json = { text };
  }
  return { status: res.status, json };
}

/** A valid rank-64 adapter of every projection of the demo model: about 1.2 MB of weights. */
export function bigDemoAdapter(seed = 1): AdapterFileBytes {
  const cfg = demoModelConfigJson();
  const config = peftConfigJson({ r: 64, loraAlpha: 128, targetModules: 'all-linear' });
  const w = randomLoraWeights(cfg, resolvePeftConfig(config, parseModelConfig(cfg), 64), seed);
  const weights = encodeSafetensors([...w].map(([name, t]) => ({ name, shape: t.shape, dtype: 'F32' as const, data: t.data })));
  return { config: Buffer.from(JSON.stringify(config)), weights };
}
