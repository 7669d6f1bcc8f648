import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { Readable } from 'node:stream';
import { after, before, test } from 'node:test';
import { writeModelFolder } from '../../src/model/synthetic/hf-folder-writer.js';
import { randomLlamaWeights } from '../../src/model/synthetic/random-weights.js';
import { TINY_CONFIGS } from '../helpers/tiny-models.js';

let root: string;
let modelDir: string;

before(async () => {
  root = await mkdtemp(join(tmpdir(), 'lora-gateway-pipe-'));
  modelDir = join(root, 'model');
  await writeModelFolder(modelDir, TINY_CONFIGS.gqa, randomLlamaWeights(TINY_CONFIGS.gqa, 7), { dtype: 'F32', shards: 1 });
});
after(async () => rm(root, { recursive: true, force: true }));

/**
 * Reads a stream the way a slow consumer (`| slow-script`) does: a small chunk, then a pause
 * with the stream stopped, so the pipe fills and the writer's data stays queued in its process.
 */
function drainSlowly(stream: Readable): Promise<string> {
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    stream.on('data', (chunk: Buffer) => {
      chunks.push(chunk);
      stream.pause();
      setTimeout(() => stream.resume(), 2);
    });
    stream.once('end', () => resolve(Buffer.concat(chunks).toString('utf8')));
    stream.once('error', reject);
  });
}

async function runCli(args: string[]): Promise<{ code: number | null; stdout: string; stderr: string }> {
  const child = spawn(process.execPath, ['--import', 'tsx', 'src/cli/main.ts', ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
  const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
  const [stdout, stderr, code] = await Promise.all([drainSlowly(child.stdout), drainSlowly(child.stderr), exited]);
  return { code, stdout, stderr };
}

test('generate --batch through a slowly drained pipe delivers every line, with logprobs and echo, and exits 0', async () => {
  const count = 400;
  const batch = join(root, 'batch.jsonl');
  const lines = Array.from({ length: count }, (_, i) => JSON.stringify({ id: `r${i}`, prompt_ids: [1, 3 + (i % 50), 7, 9 + (i % 40), 11, 13], max_tokens: 4, ignore_eos: true, logprobs: 5, echo: true }));
  await writeFile(batch, `${lines.join('\n')}\n`);
  const { code, stdout, stderr } = await runCli(['generate', '--model', modelDir, '--batch', batch, '--backend', 'wasm']);
  assert.equal(code, 0, stderr);
  const out = stdout.trimEnd().split('\n');
  assert.equal(out.length, count, `got ${out.length} of ${count} lines (${stdout.length} bytes)`);
  out.forEach((line, i) => {
    const parsed = JSON.parse(line) as { id: string; token_ids: number[]; prompt_logprobs: unknown[] };
    assert.equal(parsed.id, `r${i}`);
    assert.equal(parsed.token_ids.length, 4);
    assert.equal(parsed.prompt_logprobs.length, 6);
  });
  assert.ok(stdout.length > 1 << 20, `the output (${stdout.length} bytes) is far larger than a pipe's buffer`);
});

test('an invalid invocation through a slowly drained pipe still exits non-zero with its whole message', async () => {
  const missing = await runCli(['generate', '--model', join(root, 'no-such-model'), '--prompt-ids', '1,2', '--backend', 'wasm']);
  assert.equal(missing.code, 1);
  assert.match(missing.stderr, /^error [A-Z_]+: .*no-such-model/m);
  // an unknown flag prints the message and the whole usage text on stderr
  const unknown = await runCli(['generate', '--no-such-flag']);
  assert.equal(unknown.code, 2);
  assert.match(unknown.stderr, /no-such-flag/);
  assert.match(unknown.stderr, /--lora-strategy auto\|stacked\|segmented\n$/, 'the usage text arrives to its last line');
  assert.equal(unknown.stdout, '');
});

test('--help prints the whole usage text through a slowly drained pipe and exits 0', async () => {
  const help = await runCli(['--help']);
  assert.equal(help.code, 0);
  assert.match(help.stdout, /^lora-gateway — /);
  assert.match(help.stdout, /--lora-strategy auto\|stacked\|segmented\n$/);
});
