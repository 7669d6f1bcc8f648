import { createHash } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { basename, join } from 'node:path';
import { openCheckpoint } from '../model/formats/checkpoint.js';

/** JSON with keys sorted at every level, so two equal configs hash equally whatever their key order. */
function canonicalJson(v: unknown): string {
  if (Array.isArray(v)) return `[${v.map(canonicalJson).join(',')}]`;
  if (v && typeof v === 'object') {
    return `{${Object.keys(v)
      .sort()
      .map((k) => `${JSON.stringify(k)}:${canonicalJson((v as Record<string, unknown>)[k])}`)
      .join(',')}}`;
  }
  return JSON.stringify(v);
}

async function fileSha256(path: string): Promise<string> {
  const hash = createHash('sha256');
  for await (const chunk of createReadStream(path)) hash.update(chunk as Buffer);
  return hash.digest('hex');
}

/**
 * Identifies a base model by content: sha256 over the canonical config.json and the sha256 of
 * every weight file (by file name). A LoRA update is only meaningful against the exact base it
 * was trained on, so the coordinator refuses clients whose fingerprint differs from the
 * server's. `torch_dtype` is left out: it names the stored format, which the weights' hashes
 * already pin.
 */
export async function baseModelFingerprint(modelDir: string): Promise<string> {
  const config = JSON.parse(await readFile(join(modelDir, 'config.json'), 'utf8')) as Record<string, unknown>;
  delete config.torch_dtype;
  const checkpoint = await openCheckpoint(modelDir);
  const files = [...checkpoint.files];
  await checkpoint.close();
  const parts = [`config:${canonicalJson(config)}`];
  for (const f of files.sort()) parts.push(`${basename(f)}:${await fileSha256(f)}`);
  return createHash('sha256').update(parts.join('\n')).digest('hex');
}
