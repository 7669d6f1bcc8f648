import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { test } from 'node:test';
import { promisify } from 'node:util';

const run = promisify(execFile);
const help = async (...args: string[]) => (await run(process.execPath, ['--import', 'tsx', 'src/cli/main.ts', ...args, '--help'])).stdout;

/** The options each command reads (main.ts), each of which its --help must list on a line of its own. */
const OPTIONS: Record<string, string[]> = {
  serve: ['model', 'adapter-dir', 'host', 'port', 'served-model-name', 'data', 'device-memory', 'host-memory', 'max-running-seqs', 'max-batch-tokens', 'max-adapters-per-batch', 'max-waiting', 'body-limit', 'engine-thread', 'redis', 'federation-prefix', 'federation-keep-updates', 'log-level', 'keep-versions', 'api-keys', 'metrics-public', 'allow-unauthenticated', 'lora-path-root', 'header-timeout', 'request-timeout', 'keep-alive-timeout', 'shutdown-grace', 'backend', 'max-lora-rank', 'lora-strategy'],
  generate: ['model', 'adapter', 'prompt', 'prompt-ids', 'batch', 'max-tokens', 'temperature', 'top-p', 'top-k', 'seed', 'logprobs', 'echo', 'ignore-eos', 'json', 'backend'],
  'demo-model': ['out', 'adapters', 'dtype'],
  demo: ['data', 'backend'],
  'fed-client': ['redis', 'client-id', 'data', 'model', 'federation-prefix', 'poison', 'backend'],
  'api-key': ['api-keys', 'tenant', 'role', 'id', 'key', 'json'],
  'fed-client-acl': ['client-id', 'federation-prefix', 'json'],
  'privacy-epsilon': ['sample-rate', 'noise-multiplier', 'target-epsilon', 'steps', 'delta', 'json'],
};

test("each command's --help lists its own options, one line each, and exits 0", async () => {
  for (const [command, options] of Object.entries(OPTIONS)) {
    const text = await help(command);
    assert.ok(text.startsWith(`lora-gateway ${command} — `), `${command}: ${text.split('\n')[0]}`);
    for (const o of options) assert.match(text, new RegExp(`^\\s+--${o}\\b.*\\S`, 'm'), `${command} --help lists --${o}`);
  }
  const overview = await help();
  assert.match(overview, /lora-gateway <command> --help/);
});
