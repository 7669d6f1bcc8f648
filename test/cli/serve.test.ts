import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, test } from 'node:test';
import { startServe } from '../helpers/serve-process.js';

let dataDir: string | undefined;
after(async () => dataDir && rm(dataDir, { recursive: true, force: true }));

test('serve without --model creates the demo model, prints a working curl line, and answers it; --body-limit applies', async () => {
  dataDir = await mkdtemp(join(tmpdir(), 'lora-gateway-serve-'));
  // stdout is a pipe here: startup lines come as JSON log entries (test/helpers/serve-process.ts)
  const server = await startServe(['--data', dataDir, '--port', '0', '--backend', 'wasm', '--body-limit', '4KiB']);
  try {
    const curl = /try: (curl .*)$/.exec((await server.waitFor((e) => e.msg.startsWith('try: curl'))).msg)![1];
    const log = server.text();
    assert.match(log, /tensor backend: wasm/);
    assert.match(log, /serving demo-model with 4 adapters/);
    // run what the printed line asks for
    const url = /curl -s (\S+)/.exec(curl)![1];
    const body = /-d '(.*)'$/.exec(curl)![1];
    const res = await fetch(url, { method: 'POST', headers: { 'content-type': 'application/json' }, body });
    assert.equal(res.status, 200);
    const json = (await res.json()) as { object: string; choices: { text: string }[] };
    assert.equal(json.object, 'text_completion');
    assert.equal(typeof json.choices[0].text, 'string');
    const tooBig = await fetch(url, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ model: 'demo-model', prompt: 'x'.repeat(8192) }) });
    assert.equal(tooBig.status, 413);
  } finally {
    await server.stop();
  }
});

test('a taken port ends serve with exit code 1 and one clear error line, no stack trace', async () => {
  const blocker = createServer();
  await new Promise<void>((r) => blocker.listen(0, '127.0.0.1', () => r()));
  const port = (blocker.address() as { port: number }).port;
  const dataDir = await mkdtemp(join(tmpdir(), 'lora-gateway-port-'));
  try {
    const child = spawn(process.execPath, ['--import', 'tsx', 'src/cli/main.ts', 'serve', '--data', dataDir, '--port', String(port), '--backend', 'wasm'], { stdio: ['ignore', 'pipe', 'pipe'] });
    let stderr = '';
    child.stderr!.on('data', (d) => (stderr += d));
    const code = await new Promise<number | null>((r) => child.once('exit', r));
    assert.equal(code, 1, stderr);
    const errors = stderr.split('\n').filter((l) => /error/i.test(l));
    assert.equal(errors.length, 1, stderr);
    assert.match(errors[0], new RegExp(`^error LISTEN_FAILED: cannot listen on 127\\.0\\.0\\.1:${port}: the address is already in use`));
    assert.ok(!/\n\s+at /.test(stderr), `no stack trace:\n${stderr}`);
  } finally {
    blocker.close();
    await rm(dataDir, { recursive: true, force: true });
  }
});
