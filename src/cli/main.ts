#!/usr/bin/env node
import { existsSync, realpathSync } from 'node:fs';
import { readdir } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { engineConfigFrom, parseBytes, parseDuration, parseServeConfig, type EngineConfig } from '../config.js';
import { LoraGatewayError } from '../errors.js';
import { packageVersion } from '../package-version.js';
import { resolveBackend } from '../model/backend/backend.js';
import type { LlamaModel } from '../model/forward/llama-model.js';
import { loadLlamaModel } from '../model/forward/model-loader.js';
import { COMMAND_HELP } from './command-help.js';
import { writeDemoModel } from './demo-model-command.js';
import { fedClientAcl as fedClientAclFor } from '../federation/client-acl.js';
import { apiKeyCommand } from './api-key-command.js';
import { runFedClient } from './fed-client-command.js';
import { privacyEpsilon } from './privacy-epsilon-command.js';
import { serve } from './serve-command.js';
import { batchBaseDir, loadTokenizerIfPresent, readBatchFile, runBatchLines, type BatchLine, type GenerateContext } from './generate-command.js';

const USAGE = `lora-gateway — many LoRA adapters of one Llama-family model, on TensorFlow.js

Usage:
  lora-gateway --version
  lora-gateway generate --model DIR [--adapter DIR] (--prompt TEXT | --prompt-ids 1,2,3)
                        [--max-tokens N] [--temperature T] [--top-p P] [--top-k K] [--seed S]
                        [--logprobs N] [--echo] [--ignore-eos] [--json]
  lora-gateway generate --model DIR --batch FILE.jsonl
  lora-gateway demo-model --out DIR [--adapters N] [--dtype F32|F16|BF16]
  lora-gateway demo [--data DIR]     (one batch on the demo model in DIR/demo-model, as serve uses it)
  lora-gateway serve [--model DIR] [--adapter-dir DIR] [--host H] [--port P] [--served-model-name NAME]
                     [--data DIR] [--device-memory 256MiB] [--host-memory 1GiB] [--max-running-seqs N]
                     [--max-batch-tokens N] [--max-adapters-per-batch N] [--max-waiting N] [--body-limit 256MiB]
                     [--engine-thread on|off] [--redis URL] [--federation-prefix P] [--federation-keep-updates on|off]
                     [--api-keys FILE] [--metrics-public] [--allow-unauthenticated] [--lora-path-root DIR]
                     [--log-level info] [--keep-versions N]
                     [--header-timeout 10s] [--request-timeout 300s] [--keep-alive-timeout 72s] [--shutdown-grace 30s]
      without --model: serves the demo model (created once under --data, default ./data)
      with --redis: also runs federated training jobs (POST /v1/federation/jobs)
  lora-gateway api-key create --api-keys FILE --tenant T [--role admin|tenant] [--json]
  lora-gateway api-key revoke --api-keys FILE (--id KEY_ID | --key KEY | --tenant T) [--json]
  lora-gateway api-key list --api-keys FILE [--json]
      keys for serve --api-keys (stored as SHA-256; a running server re-reads the file on SIGHUP)
  lora-gateway fed-client-acl --client-id ID [--federation-prefix P] [--json]
      the Redis ACL rules that confine one fed-client to its own queue and update keys
  lora-gateway privacy-epsilon --sample-rate Q (--noise-multiplier S | --target-epsilon E) --steps N --delta D [--json]
      ε of DP-SGD / DP-FedAvg by the RDP accountant (as Opacus), or the σ that meets a target ε
  lora-gateway fed-client --redis URL --client-id ID --data PATH --model DIR [--federation-prefix P] [--poison scale:K]
      one federation client: trains on its own text (.txt, folder, or .jsonl with "text"), uploads only LoRA updates

Each command's own options: lora-gateway <command> --help

Engine options (also LORA_GATEWAY_BACKEND, LORA_GATEWAY_MAX_LORA_RANK, LORA_GATEWAY_LORA_STRATEGY):
  --backend auto|tensorflow|wasm|cpu   tensor backend (auto: tfjs-node-gpu, tfjs-node, then wasm)
  --max-lora-rank N                    largest adapter rank accepted (default 64)
  --lora-strategy auto|stacked|segmented
`;

const OPTIONS = {
  model: { type: 'string' },
  adapter: { type: 'string' },
  prompt: { type: 'string' },
  'prompt-ids': { type: 'string' },
  'max-tokens': { type: 'string' },
  temperature: { type: 'string' },
  'top-p': { type: 'string' },
  'top-k': { type: 'string' },
  seed: { type: 'string' },
  logprobs: { type: 'string' },
  echo: { type: 'boolean' },
  'ignore-eos': { type: 'boolean' },
  json: { type: 'boolean' },
  batch: { type: 'string' },
  out: { type: 'string' },
  adapters: { type: 'string' },
  dtype: { type: 'string' },
  data: { type: 'string' },
  'adapter-dir': { type: 'string' },
  host: { type: 'string' },
  port: { type: 'string' },
  'served-model-name': { type: 'string' },
  'device-memory': { type: 'string' },
  'host-memory': { type: 'string' },
  'max-running-seqs': { type: 'string' },
  'max-batch-tokens': { type: 'string' },
  'max-adapters-per-batch': { type: 'string' },
  'max-waiting': { type: 'string' },
  'body-limit': { type: 'string' },
  redis: { type: 'string' },
  'federation-prefix': { type: 'string' },
  'federation-keep-updates': { type: 'string' },
  'engine-thread': { type: 'string' },
  'log-level': { type: 'string' },
  'keep-versions': { type: 'string' },
  'header-timeout': { type: 'string' },
  'request-timeout': { type: 'string' },
  'keep-alive-timeout': { type: 'string' },
  'shutdown-grace': { type: 'string' },
  'client-id': { type: 'string' },
  backend: { type: 'string' },
  'max-lora-rank': { type: 'string' },
  'lora-strategy': { type: 'string' },
  poison: { type: 'string' },
  'api-keys': { type: 'string' },
  'metrics-public': { type: 'boolean' },
  'allow-unauthenticated': { type: 'boolean' },
  'lora-path-root': { type: 'string' },
  tenant: { type: 'string' },
  role: { type: 'string' },
  id: { type: 'string' },
  key: { type: 'string' },
  help: { type: 'boolean', short: 'h' },
} as const;

type Flags = ReturnType<typeof parseArgs<{ options: typeof OPTIONS; allowPositionals: true }>>['values'];

function num(v: string | undefined, name: string): number | undefined {
  if (v === undefined) return undefined;
  const n = Number(v);
  if (!Number.isFinite(n)) throw new LoraGatewayError('REQUEST_INVALID', `--${name} must be a number, got '${v}'`);
  return n;
}

function onOff(v: string | undefined, name: string): boolean | undefined {
  if (v === undefined) return undefined;
  if (/^(on|true|1|yes)$/i.test(v)) return true;
  if (/^(off|false|0|no)$/i.test(v)) return false;
  throw new LoraGatewayError('CONFIG_INVALID', `--${name} must be on or off, got '${v}'`);
}

function logToStderr(line: string): void {
  process.stderr.write(`${line}\n`);
}

async function openModel(config: EngineConfig, modelDir: string): Promise<GenerateContext> {
  await resolveBackend(config.backend, logToStderr);
  const model: LlamaModel = await loadLlamaModel(modelDir);
  return { model, tokenizer: await loadTokenizerIfPresent(modelDir), config, adapters: new Map() };
}

async function closeModel(ctx: GenerateContext): Promise<void> {
  for (const a of ctx.adapters.values()) (await a.catch(() => undefined))?.dispose();
  ctx.model.dispose();
}

async function generate(flags: Flags, config: EngineConfig): Promise<void> {
  if (!flags.model) throw new LoraGatewayError('REQUEST_INVALID', 'generate needs --model DIR');
  const ctx = await openModel(config, flags.model);
  try {
    if (flags.batch) {
      ctx.baseDir = batchBaseDir(flags.batch);
      const lines = await readBatchFile(flags.batch);
      for (const out of await runBatchLines(ctx, lines)) process.stdout.write(`${JSON.stringify(out)}\n`);
      return;
    }
    const line: BatchLine = {
      prompt: flags.prompt,
      prompt_ids: flags['prompt-ids']?.split(',').map((s) => Number(s.trim())),
      adapter: flags.adapter ?? null,
      max_tokens: num(flags['max-tokens'], 'max-tokens'),
      temperature: num(flags.temperature, 'temperature'),
      top_p: num(flags['top-p'], 'top-p'),
      top_k: num(flags['top-k'], 'top-k'),
      seed: num(flags.seed, 'seed'),
      logprobs: num(flags.logprobs, 'logprobs'),
      echo: flags.echo ?? false,
      ignore_eos: flags['ignore-eos'] ?? false,
    };
    // Plain output streams text as tokens arrive; the decoder never splits a UTF-8 character.
    const stream = !flags.json && ctx.tokenizer ? ctx.tokenizer.createStreamDecoder() : undefined;
    const [out] = await runBatchLines(ctx, [line], stream && ((_, token) => process.stdout.write(stream.push(token))));
    const asError = out as { error?: { code: string; message: string } };
    if (asError.error) throw new LoraGatewayError(asError.error.code as LoraGatewayError['code'], asError.error.message);
    if (flags.json) process.stdout.write(`${JSON.stringify(out)}\n`);
    else if (stream) process.stdout.write(`${stream.flush()}\n`);
    else process.stdout.write(`${(out as { token_ids: number[] }).token_ids.join(',')}\n`);
  } finally {
    await closeModel(ctx);
  }
}

async function demoModel(flags: Flags): Promise<void> {
  if (!flags.out) throw new LoraGatewayError('REQUEST_INVALID', 'demo-model needs --out DIR');
  const dtype = (flags.dtype ?? 'F32').toUpperCase();
  if (dtype !== 'F32' && dtype !== 'F16' && dtype !== 'BF16') throw new LoraGatewayError('REQUEST_INVALID', `--dtype must be F32, F16 or BF16, got '${flags.dtype}'`);
  const { adapterDirs } = await writeDemoModel(flags.out, { adapters: num(flags.adapters, 'adapters') ?? 4, dtype });
  process.stdout.write(`wrote a demo model to ${flags.out} with ${adapterDirs.length} adapters under ${join(flags.out, 'adapters')}\n`);
}

/** `npm start`: make the demo model once, then run one heterogeneous batch over its adapters. */
async function demo(flags: Flags, config: EngineConfig): Promise<void> {
  // --data is the data folder, as for serve: the demo model lives in <data>/demo-model
  const dir = resolve(flags.data ?? process.env.LORA_GATEWAY_DATA_DIR ?? 'data', 'demo-model');
  if (!existsSync(join(dir, 'config.json'))) {
    logToStderr(`creating the demo model in ${dir} ...`);
    await writeDemoModel(dir, { adapters: 4 });
  }
  // a model folder without adapters runs the base model alone
  const adapterNames = existsSync(join(dir, 'adapters')) ? (await readdir(join(dir, 'adapters'))).sort() : [];
  const ctx = await openModel(config, dir);
  try {
    const lines = [null, ...adapterNames].map((name, i) => ({
      id: name ?? 'base',
      prompt: 'The quick brown fox',
      adapter: name ? join(dir, 'adapters', name) : null,
      max_tokens: 12,
      temperature: 0,
      ignore_eos: true,
      seed: i,
    }));
    const results = await runBatchLines(ctx, lines);
    logToStderr(`one batch, ${lines.length} sequences, each with its own adapter (random weights: the text is gibberish):`);
    for (const r of results) process.stdout.write(`${JSON.stringify(r)}\n`);
    const adapterFlag = adapterNames.length > 0 ? ` --adapter ${join(dir, 'adapters', adapterNames[0])}` : '';
    logToStderr(`\ntry: node dist/cli/main.js generate --model ${dir}${adapterFlag} --prompt "Hello" --logprobs 3 --json`);
  } finally {
    await closeModel(ctx);
  }
}

async function fedClient(flags: Flags, config: EngineConfig): Promise<void> {
  const redisUrl = flags.redis ?? process.env.LORA_GATEWAY_REDIS_URL;
  const missing = [!redisUrl && '--redis URL', !flags['client-id'] && '--client-id ID', !flags.data && '--data PATH', !flags.model && '--model DIR'].filter(Boolean);
  if (missing.length > 0) throw new LoraGatewayError('REQUEST_INVALID', `fed-client needs ${missing.join(', ')}`);
  await resolveBackend(config.backend, logToStderr);
  await runFedClient({
    redisUrl: redisUrl!,
    prefix: flags['federation-prefix'] ?? process.env.LORA_GATEWAY_FEDERATION_PREFIX,
    clientId: flags['client-id']!,
    modelDir: flags.model!,
    dataPath: flags.data!,
    log: logToStderr,
    tty: process.stderr.isTTY === true,
    poison: flags.poison,
  });
}

/** `fed-client-acl`: the ACL SETUSER line (and the URL the client then uses) for one client. */
function fedClientAcl(flags: Flags): void {
  if (!flags['client-id']) throw new LoraGatewayError('REQUEST_INVALID', 'fed-client-acl needs --client-id ID');
  const acl = fedClientAclFor(flags['federation-prefix'] ?? process.env.LORA_GATEWAY_FEDERATION_PREFIX ?? 'lora-gateway', flags['client-id']);
  if (flags.json) process.stdout.write(`${JSON.stringify(acl)}\n`);
  else {
    process.stdout.write(`${acl.command}\n`);
    logToStderr(`run it with redis-cli as an admin; then: lora-gateway fed-client --redis redis://${acl.user}:${acl.password}@HOST:PORT --client-id ${flags['client-id']} ...`);
  }
}

export { packageVersion };

export async function main(argv: string[]): Promise<number> {
  if (argv[0] === '--version' || argv[0] === '-v') {
    process.stdout.write(`lora-gateway ${packageVersion()}\n`);
    return 0;
  }
  // its own options (no engine, no model): parsed apart from the rest
  if (argv[0] === 'privacy-epsilon') return privacyEpsilon(argv.slice(1), (s) => process.stdout.write(s), (s) => process.stderr.write(s));
  let parsed;
  try {
    parsed = parseArgs({ args: argv, options: OPTIONS, allowPositionals: true, strict: true });
  } catch (err) {
    process.stderr.write(`${(err as Error).message}\n\n${USAGE}`);
    return 2;
  }
  const { values: flags, positionals } = parsed;
  const command = positionals[0];
  if (flags.help && command && COMMAND_HELP[command]) {
    process.stdout.write(COMMAND_HELP[command]);
    return 0;
  }
  if (flags.help || !command) {
    process.stdout.write(USAGE);
    return command || flags.help ? 0 : 2;
  }
  try {
    const config = engineConfigFrom(flags);
    if (command === 'generate') await generate(flags, config);
    else if (command === 'demo-model') await demoModel(flags);
    else if (command === 'demo') await demo(flags, config);
    else if (command === 'fed-client') await fedClient(flags, config);
    else if (command === 'api-key') await apiKeyCommand(positionals[1], flags, (line) => process.stdout.write(line));
    else if (command === 'fed-client-acl') fedClientAcl(flags);
    else if (command === 'serve') {
      const env = process.env;
      const serveConfig = parseServeConfig({
        host: flags.host ?? env.LORA_GATEWAY_HOST,
        port: num(flags.port ?? env.LORA_GATEWAY_PORT, 'port'),
        servedModelName: flags['served-model-name'],
        adapterDir: flags['adapter-dir'],
        dataDir: flags.data ?? env.LORA_GATEWAY_DATA_DIR,
        deviceMemoryBytes: parseBytes(flags['device-memory'] ?? env.LORA_GATEWAY_DEVICE_MEMORY, 'device-memory'),
        hostMemoryBytes: parseBytes(flags['host-memory'] ?? env.LORA_GATEWAY_HOST_MEMORY, 'host-memory'),
        maxRunningSeqs: num(flags['max-running-seqs'], 'max-running-seqs'),
        maxBatchTokens: num(flags['max-batch-tokens'], 'max-batch-tokens'),
        maxAdaptersPerBatch: num(flags['max-adapters-per-batch'], 'max-adapters-per-batch'),
        maxWaiting: num(flags['max-waiting'], 'max-waiting'),
        engineThread: onOff(flags['engine-thread'] ?? env.LORA_GATEWAY_ENGINE_THREAD, 'engine-thread'),
        bodyLimitBytes: parseBytes(flags['body-limit'] ?? env.LORA_GATEWAY_BODY_LIMIT, 'body-limit'),
        redisUrl: flags.redis ?? env.LORA_GATEWAY_REDIS_URL,
        federationPrefix: flags['federation-prefix'] ?? env.LORA_GATEWAY_FEDERATION_PREFIX,
        federationKeepUpdates: onOff(flags['federation-keep-updates'], 'federation-keep-updates'),
        apiKeysPath: flags['api-keys'] ?? env.LORA_GATEWAY_API_KEYS,
        metricsPublic: flags['metrics-public'],
        allowUnauthenticated: flags['allow-unauthenticated'],
        loraPathRoot: flags['lora-path-root'] ?? env.LORA_GATEWAY_LORA_PATH_ROOT,
        logLevel: flags['log-level'] ?? env.LORA_GATEWAY_LOG_LEVEL,
        keepVersions: num(flags['keep-versions'] ?? env.LORA_GATEWAY_KEEP_VERSIONS, 'keep-versions'),
        headerTimeoutMs: parseDuration(flags['header-timeout'], 'header-timeout'),
        requestTimeoutMs: parseDuration(flags['request-timeout'], 'request-timeout'),
        keepAliveTimeoutMs: parseDuration(flags['keep-alive-timeout'], 'keep-alive-timeout'),
        shutdownGraceMs: parseDuration(flags['shutdown-grace'], 'shutdown-grace'),
      });
      const server = await serve({ modelDir: flags.model, engine: config, serve: serveConfig, log: logToStderr });
      await new Promise<void>((done, fail) => {
        let stopping = false;
        const stop = (signal: NodeJS.Signals) => {
          if (stopping) return logToStderr(`${signal}: already shutting down (within --shutdown-grace ${serveConfig.shutdownGraceMs} ms)`);
          stopping = true;
          logToStderr(`${signal}: draining; running requests have ${serveConfig.shutdownGraceMs} ms to finish`);
          server.close().then(done, fail);
        };
        process.on('SIGINT', stop);
        process.on('SIGTERM', stop);
      });
    }
    else {
      process.stderr.write(`unknown command '${command}'\n\n${USAGE}`);
      return 2;
    }
    return 0;
  } catch (err) {
    if (err instanceof LoraGatewayError) {
      process.stderr.write(`error ${err.code}: ${err.message}\n`);
      return 1;
    }
    // a system error (a file that cannot be read, a socket that cannot open): one line, not a stack
    const code = (err as NodeJS.ErrnoException).code;
    if (typeof code === 'string' && /^E[A-Z]+$/.test(code)) {
      process.stderr.write(`error ${code}: ${(err as Error).message}\n`);
      return 1;
    }
    throw err;
  }
}

/**
 * Resolves once everything written to `stream` so far has left the process. Writes to a pipe are
 * asynchronous on POSIX: `process.exit` right after them drops what is still queued (a reader
 * that drains slowly then sees only part of the output). Writable streams complete writes in
 * order, so the callback of an empty write fires after every earlier chunk is flushed.
 */
function flushed(stream: NodeJS.WriteStream): Promise<void> {
  return new Promise((done) => {
    if (stream.destroyed || stream.writableEnded) done();
    else stream.write('', () => done());
  });
}

/** Exits with `code` only after stdout and stderr are flushed, on pipes, files and terminals alike. */
async function exitAfterFlush(code: number): Promise<never> {
  process.exitCode = code;
  await Promise.all([flushed(process.stdout), flushed(process.stderr)]);
  process.exit(code);
}

// Run when executed (also through npm's bin symlink), not when imported by tests.
const invokedDirectly = process.argv[1] !== undefined && realpathSync(process.argv[1]) === fileURLToPath(import.meta.url);
if (invokedDirectly) {
  // A reader that closes its end early (`| head`) is not an error of ours: stop writing, exit quietly.
  process.stdout.on('error', (err: NodeJS.ErrnoException) => {
    if (err.code === 'EPIPE') process.exit(process.exitCode ?? 0);
    throw err;
  });
  main(process.argv.slice(2))
    .catch((err: unknown) => {
      process.stderr.write(`${err instanceof Error ? (err.stack ?? err.message) : String(err)}\n`);
      return 1;
    })
    .then(exitAfterFlush);
}
