import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, test } from 'node:test';
import { connectRaw, drip, parseRawResponse } from '../helpers/raw-http.js';

let dataDir: string | undefined;
after(async () => dataDir && rm(dataDir, { recursive: true, force: true }));

const GRACE_MS = 1500;
// engine thread stop and process exit after the grace (and the 1 s given to cancelled requests to write their error)
const MARGIN_MS = 8000;

test('SIGTERM: idle, dripping and streaming connections cannot hold the shutdown open; the stream ends (or is cancelled with server_shutting_down); exit 0 within the grace', async () => {
  dataDir = await mkdtemp(join(tmpdir(), 'lora-gateway-shutdown-'));
  const child = spawn(
    process.execPath,
    ['--import', 'tsx', 'src/cli/main.ts', 'serve', '--data', dataDir, '--port', '0', '--backend', 'wasm', '--shutdown-grace', `${GRACE_MS}ms`, '--header-timeout', '60s', '--keep-alive-timeout', '60s'],
    { stdio: ['ignore', 'pipe', 'pipe'] },
  );
  const exited = new Promise<number | null>((r) => child.once('exit', r));
  let log = '';
  try {
    const baseUrl = await new Promise<string>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`not serving within 60 s:\n${log}`)), 60_000);
      // stdout is a pipe, so the startup lines come as JSON there; stderr keeps anything else
      const onData = (d: Buffer) => {
        log += d.toString();
        const m = / at (http:\/\/\S+) \(device pool/.exec(log);
        if (m) {
          clearTimeout(timer);
          resolve(m[1]);
        }
      };
      child.stdout.on('data', onData);
      child.stderr.on('data', onData);
      void exited.then((code) => reject(new Error(`serve exited with ${code}:\n${log}`)));
    });

    // an idle keep-alive connection: one response, then nothing
    const idle = await connectRaw(baseUrl);
    idle.socket.write('GET /health HTTP/1.1\r\nHost: x\r\n\r\n');
    while (!idle.received().includes('"ok"')) await new Promise((r) => setTimeout(r, 10));
    // a client dripping its headers, far slower than any timeout of this run
    const slow = await connectRaw(baseUrl);
    const stopDrip = drip(slow.socket, `GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ${'a'.repeat(500)}\r\n\r\n`, 200);
    // a stream in flight: 1900 tokens take longer than the grace on this model
    const stream = await fetch(`${baseUrl}/v1/completions`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ model: 'demo-model', prompt: 'keep going', max_tokens: 1900, ignore_eos: true, stream: true }),
    });
    assert.equal(stream.status, 200);
    const reader = stream.body!.getReader();
    let text = new TextDecoder().decode((await reader.read()).value);

    const signalledAt = performance.now();
    child.kill('SIGTERM');
    // the idle connection is closed at once, not after its keep-alive timeout
    await idle.closed;
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      text += new TextDecoder().decode(value);
    }
    const code = await exited;
    const tookMs = performance.now() - signalledAt;
    stopDrip();
    assert.equal(code, 0, log);
    assert.ok(tookMs < GRACE_MS + MARGIN_MS, `exited ${tookMs.toFixed(0)} ms after SIGTERM:\n${log}`);
    // the dripping client was cut by the shutdown (its header timeout is a minute away)
    assert.ok(slow.socket.destroyed);
    assert.equal(parseRawResponse(idle.received()).status, 200);

    const events = text.split('\n\n').filter((e) => e.startsWith('data: '));
    assert.equal(events.at(-1), 'data: [DONE]');
    const last = JSON.parse(events.at(-2)!.slice(6)) as { error?: { code: string }; choices?: { finish_reason: string | null }[] };
    if (last.error) {
      assert.equal(last.error.code, 'server_shutting_down');
      assert.match(log, /cancelling 1 running request/);
    } else assert.equal(last.choices?.[0].finish_reason, 'length');
    assert.match(log, /SIGTERM: draining/);
  } finally {
    if (child.exitCode === null) child.kill('SIGKILL');
  }
});
