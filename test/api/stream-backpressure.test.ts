import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import * as tf from '@tensorflow/tfjs-core';
import type { FastifyInstance } from 'fastify';
import { buildApp } from '../../src/api/app.js';
import { GatewayMetrics } from '../../src/api/metrics.js';
import { startGateway, type GatewayFixture } from '../helpers/gateway-fixture.js';

const BOUND = 64 * 1024;
const STREAMS = 6;

let fx: GatewayFixture;
let unixApp: FastifyInstance;
let socketDir: string;
let socketPath: string;
before(async () => {
  fx = await startGateway(1);
  // A Unix socket holds ~200 KiB in the kernel, a loopback TCP connection megabytes: over Unix, a
  // reader that stops reading makes the server's own buffer grow within a few hundred tokens.
  socketDir = await mkdtemp(join(tmpdir(), 'lora-gateway-sock-'));
  socketPath = join(socketDir, 'http.sock');
  unixApp = await buildApp({ engine: fx.gateway, metrics: new GatewayMetrics(fx.gateway), streamBufferBytes: BOUND });
  await unixApp.listen({ path: socketPath });
});
after(async () => {
  await unixApp.close();
  await fx.close();
  await rm(socketDir, { recursive: true, force: true });
});

test('streams whose clients never read are cancelled once 64 KiB is unsent: bytes held stay bounded, other requests complete, no tensor is left', { timeout: 90_000 }, async () => {
  const tensorsBefore = tf.memory().numTensors;
  const serverSockets = new Set<net.Socket>();
  unixApp.server.on('connection', (s: net.Socket) => serverSockets.add(s));
  let maxHeld = 0;
  const sample = setInterval(() => {
    for (const s of serverSockets) maxHeld = Math.max(maxHeld, s.writableLength);
  }, 5);

  // each answer would be ~1.2 MB of events (1900 tokens, 20 logprobs each)
  const body = JSON.stringify({ model: 'demo-model', prompt: 'never read', max_tokens: 1900, ignore_eos: true, stream: true, logprobs: 20 });
  const clients = Array.from({ length: STREAMS }, () => {
    const c = net.connect(socketPath);
    c.on('error', () => undefined);
    c.on('connect', () => {
      c.write(`POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: ${Buffer.byteLength(body)}\r\n\r\n${body}`);
      // never read again (a paused socket does not even see the server close it)
      c.pause();
    });
    return c;
  });

  // while they stall, another client is served in full
  const other = await fetch(`${fx.baseUrl}/v1/completions`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ model: 'demo-model', prompt: 'hello', max_tokens: 8, ignore_eos: true }) });
  assert.equal(other.status, 200);
  assert.equal(((await other.json()) as { usage: { completion_tokens: number } }).usage.completion_tokens, 8);

  // every stalled stream is cut (the server drops its connection) and its sequence leaves the engine
  const cut = () => serverSockets.size === STREAMS && [...serverSockets].every((s) => s.destroyed);
  while (!cut() || fx.gateway.stats().running > 0) await new Promise((r) => setTimeout(r, 10));
  for (const c of clients) c.destroy();
  clearInterval(sample);
  // one event past the bound at most (an event with 20 logprobs is a few KiB)
  assert.ok(maxHeld > 0 && maxHeld <= BOUND + 16 * 1024, `largest unsent buffer ${maxHeld} bytes`);
  assert.equal(fx.gateway.stats().waiting, 0);
  assert.equal(tf.memory().numTensors, tensorsBefore);
});
