import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';

let version: string | undefined;

/** This package's version, from its package.json (one folder up from src/ and dist/), read once. */
export function packageVersion(): string {
  version ??= (JSON.parse(readFileSync(fileURLToPath(new URL('../package.json', import.meta.url)), 'utf8')) as { version: string }).version;
  return version;
}
