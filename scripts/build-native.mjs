#!/usr/bin/env node
// Builds native/blas (OpenBLAS sgemm for the wasm backend's matrix products) with the node-gyp
// that ships with npm. Optional by design: without libopenblas-dev or a compiler it prints why
// and exits 0, and the engine runs its wasm kernels (startup says so).
import { spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const dir = join(root, 'native', 'blas');
const say = (line) => process.stderr.write(`lora-gateway native BLAS: ${line}\n`);

if (process.env.LORA_GATEWAY_NATIVE_BLAS === 'off') {
  say('skipped (LORA_GATEWAY_NATIVE_BLAS=off)');
  process.exit(0);
}
const header = ['/usr/include/x86_64-linux-gnu/cblas.h', '/usr/include/cblas.h', '/usr/include/openblas/cblas.h', '/usr/include/aarch64-linux-gnu/cblas.h'].find(existsSync);
if (!header) {
  say('not built: OpenBLAS headers not found (Debian/Ubuntu: apt-get install libopenblas-dev, then npm run build:native); matrix products stay on wasm');
  process.exit(0);
}
// node-gyp: npm's bundled copy (next to npm-cli.js), else one on the PATH
const npmCli = process.env.npm_execpath;
const candidates = [npmCli && join(dirname(npmCli), '..', 'node_modules', 'node-gyp', 'bin', 'node-gyp.js'), '/usr/lib/node_modules/npm/node_modules/node-gyp/bin/node-gyp.js'].filter(Boolean);
const gyp = candidates.find((p) => existsSync(p));
const args = ['rebuild', ...(process.env.npm_config_nodedir ? [] : ['--nodedir', dirname(dirname(process.execPath))])];
const r = gyp ? spawnSync(process.execPath, [gyp, ...args], { cwd: dir, stdio: ['ignore', 'ignore', 'pipe'], encoding: 'utf8' }) : spawnSync('node-gyp', args, { cwd: dir, stdio: ['ignore', 'ignore', 'pipe'], encoding: 'utf8' });
if (r.status !== 0) {
  const tail = (r.stderr ?? String(r.error ?? '')).split('\n').filter((l) => /error|ERR/.test(l)).slice(0, 5).join('\n  ');
  say(`not built (node-gyp failed); matrix products stay on wasm\n  ${tail}`);
  process.exit(0);
}
say(`built native/blas against ${header}`);
