import { existsSync } from 'node:fs';
import type { FastifyInstance } from 'fastify';
import { readdir } from 'node:fs/promises';
import { basename, join, resolve } from 'node:path';
import { ConfigError, LoraGatewayError } from '../errors.js';
import { LoraPathPolicy } from '../api/lora-path-policy.js';
import { ApiKeyFile } from '../tenants/api-key-file.js';
import { buildApp } from '../api/app.js';
import { FederationMetrics } from '../api/federation-metrics.js';
import { GatewayMetrics } from '../api/metrics.js';
import { buildInfoOf } from '../api/ops-routes.js';
import { createLogger } from '../api/request-log.js';
import { packageVersion } from '../package-version.js';
import { ServerLifecycle } from '../api/server-lifecycle.js';
import type { EngineConfig, ServeConfig } from '../config.js';
import { resolveBackend, type ResolvedBackend } from '../model/backend/backend.js';
import { describeLoraCostModel, measureLoraCostModel } from '../model/lora/lora-cost-model.js';
import { loadLlamaModel } from '../model/forward/model-loader.js';
import { baseModelFingerprint } from '../federation/base-fingerprint.js';
import { JOB_STATES } from '../federation/job-record.js';
import { RoundCoordinator } from '../federation/round-coordinator.js';
import { Gateway } from '../serving/gateway.js';
import { ThreadedGateway } from '../serving/threaded-gateway.js';
import { readModelConfig } from '../model/architecture/model-config.js';
import { writeDemoModel } from './demo-model-command.js';
import { loadTokenizerIfPresent } from './generate-command.js';

export interface ServeOptions {
  /** Absent: serve the demo model, created once under the data folder. */
  modelDir?: string;
  engine: EngineConfig;
  serve: ServeConfig;
  /** Startup lines when stdout is a terminal; otherwise they go through the JSON logger. */
  log: (line: string) => void;
  /** Whether stdout is a terminal (human-readable log lines) or not (JSON lines). @defaultValue process.stdout.isTTY */
  stdoutIsTerminal?: boolean;
}

async function demoModelDir(dataDir: string, log: (line: string) => void): Promise<{ modelDir: string; adapterDir: string }> {
  const modelDir = resolve(dataDir, 'demo-model');
  if (!existsSync(join(modelDir, 'config.json'))) {
    log(`no --model given: creating the demo model with 4 demo adapters in ${modelDir}`);
    await writeDemoModel(modelDir, { adapters: 4 });
  }
  return { modelDir, adapterDir: join(modelDir, 'adapters') };
}

/** Starts the gateway; resolves once it listens, with a function that shuts it down. */
export async function serve(options: ServeOptions): Promise<{ url: string; close: () => Promise<void> }> {
  const { serve: cfg, engine } = options;
  // one logger for requests and, when it writes JSON, the startup lines too: a log collector
  // reading stdout then gets nothing but JSON lines; a terminal keeps the plain lines on stderr
  const json = !(options.stdoutIsTerminal ?? process.stdout.isTTY === true);
  const logger = createLogger({ level: cfg.logLevel, json });
  const log = json ? (line: string) => logger.info(line) : options.log;
  // before anything heavy loads: a server reachable from other machines needs keys
  if (!cfg.apiKeysPath && !cfg.allowUnauthenticated && !isLoopback(cfg.host)) {
    throw new ConfigError(
      'UNAUTHENTICATED_LISTEN_REFUSED',
      `refusing to listen on ${cfg.host} without API keys: anyone who reaches it could use, overwrite or delete every adapter. Give --api-keys FILE (make one with: lora-gateway api-key create --api-keys FILE --tenant admin --role admin), or --allow-unauthenticated`,
    );
  }
  // read now, so a bad file stops startup before the model loads; watched for SIGHUP once listening starts
  const keys = cfg.apiKeysPath ? await ApiKeyFile.open(cfg.apiKeysPath) : undefined;
  const loraPaths = await LoraPathPolicy.create(cfg.loraPathRoot).catch((err: NodeJS.ErrnoException) => {
    throw new ConfigError('CONFIG_INVALID', `--lora-path-root: cannot open the folder (${err.code ?? err.message})`, { cause: err });
  });
  let modelDir = options.modelDir;
  let adapterDir = cfg.adapterDir;
  if (!modelDir) ({ modelDir, adapterDir } = await demoModelDir(cfg.dataDir, log));
  const modelId = cfg.servedModelName ?? basename(resolve(modelDir));
  const common = {
    modelId,
    tokenizer: await loadTokenizerIfPresent(modelDir),
    storeDir: resolve(cfg.dataDir, 'adapters'),
    deviceMemoryBytes: cfg.deviceMemoryBytes,
    hostMemoryBytes: cfg.hostMemoryBytes,
    maxLoraRank: engine.maxLoraRank,
    loraStrategy: engine.loraStrategy,
    keepVersions: cfg.keepVersions,
    limits: {
      maxRunningSeqs: cfg.maxRunningSeqs,
      maxBatchTokens: cfg.maxBatchTokens,
      maxAdaptersPerBatch: cfg.maxAdaptersPerBatch,
      maxWaiting: cfg.maxWaiting,
    },
  };
  let gateway: Gateway | ThreadedGateway;
  let backend: ResolvedBackend | undefined;
  if (cfg.engineThread) {
    // the engine (backend, model, batcher) on its own thread; HTTP stays on this event loop
    const threaded = await ThreadedGateway.create({ ...common, modelDir, model: await readModelConfig(modelDir), backend: engine.backend, log });
    gateway = threaded;
    backend = threaded.backend;
    log('engine: on its own worker thread (HTTP never waits for a step)');
  } else {
    backend = await resolveBackend(engine.backend, log);
    const loraCost = measureLoraCostModel();
    log(`LoRA cost model measured on this backend: ${describeLoraCostModel(loraCost)}`);
    gateway = await Gateway.create({ ...common, model: await loadLlamaModel(modelDir), loraCost });
    log('engine: on the HTTP thread (--engine-thread off)');
  }
  if (adapterDir) {
    for (const entry of (await readdir(adapterDir, { withFileTypes: true })).filter((e) => e.isDirectory())) {
      // unchanged folders are not stored again on every restart
      if (gateway.getAdapter(entry.name)) continue;
      await gateway.loadAdapterFromDir(entry.name, join(adapterDir, entry.name));
    }
  }
  if (cfg.keepVersions !== undefined) log(`adapter versions: the newest ${cfg.keepVersions} of each kept on disk, older ones removed once no request uses them`);
  const metrics = new GatewayMetrics(gateway);
  let coordinator: RoundCoordinator | undefined;
  if (cfg.redisUrl) {
    const fingerprint = await baseModelFingerprint(modelDir);
    // the gauges read the coordinator at scrape time; until it has started they read zero
    const observer = new FederationMetrics(metrics.registry, {
      jobsByState: async () => {
        const counts = Object.fromEntries(JOB_STATES.map((s) => [s, 0])) as Record<(typeof JOB_STATES)[number], number>;
        for (const j of (await coordinator?.list()) ?? []) counts[j.state]++;
        return counts;
      },
      liveClients: async () => ((await coordinator?.clients()) ?? []).length,
    });
    coordinator = await RoundCoordinator.start({
      redisUrl: cfg.redisUrl,
      prefix: cfg.federationPrefix,
      model: gateway.model,
      fingerprint,
      maxLoraRank: engine.maxLoraRank,
      publisher: gateway,
      keepUpdates: cfg.federationKeepUpdates,
      observer,
      log,
    });
    log(`federation on: Redis ${redactUrl(cfg.redisUrl)}, key prefix '${cfg.federationPrefix}', base model fingerprint ${fingerprint.slice(0, 12)}`);
  } else {
    log('federation off (start with --redis URL to run federated training jobs)');
  }
  const lifecycle = new ServerLifecycle();
  const timeouts = { headerTimeoutMs: cfg.headerTimeoutMs, requestTimeoutMs: cfg.requestTimeoutMs, keepAliveTimeoutMs: cfg.keepAliveTimeoutMs };
  const app = await buildApp({
    engine: gateway,
    metrics,
    bodyLimitBytes: cfg.bodyLimitBytes,
    coordinator,
    logger,
    build: buildInfoOf(packageVersion(), backend),
    apiKeys: keys && (() => keys.ring),
    metricsPublic: cfg.metricsPublic,
    loraPaths,
    lifecycle,
    timeouts,
  });
  if (keys) log(`API keys on: ${keys.ring.size} key(s) from --api-keys (re-read on SIGHUP); /metrics ${cfg.metricsPublic ? 'public' : 'needs an admin key'}`);
  else log(`API keys off: every client is admin (local development); start with --api-keys FILE to give tenants their own adapters`);
  log(loraPaths.enabled ? 'load_lora_adapter: reads folders under --lora-path-root' : 'load_lora_adapter: off (start with --lora-path-root DIR to register server folders at runtime)');
  keys?.watch(log);
  let url: string;
  try {
    // a burst of connections waits in the kernel's accept queue rather than being refused (Node's default is 511; the kernel caps it at somaxconn)
    url = await app.listen({ host: cfg.host, port: cfg.port, backlog: LISTEN_BACKLOG });
  } catch (err) {
    // the engine thread and the federation queues are up: stop them, then say why in one line
    await app.close().catch(() => undefined);
    await coordinator?.close().catch(() => undefined);
    await gateway.close().catch(() => undefined);
    keys?.close();
    const code = (err as NodeJS.ErrnoException).code;
    const why = code === 'EADDRINUSE' ? 'is already in use' : code === 'EACCES' ? 'needs privileges this process lacks' : code === 'EADDRNOTAVAIL' ? 'is not an address of this machine' : `failed (${(err as Error).message})`;
    throw new LoraGatewayError('LISTEN_FAILED', `cannot listen on ${cfg.host}:${cfg.port}: the address ${why} (choose another with --host / --port)`, { cause: err });
  }
  const adapters = gateway.listAdapters();
  log(`serving ${modelId} with ${adapters.length} adapters at ${url} (device pool ${gateway.poolCapacity} pages)`);
  const example = adapters[0]?.id ?? modelId;
  log(
    `try: curl -s ${url}/v1/completions -H 'content-type: application/json' -d '{"model": "${example}", "prompt": "The quick brown fox", "max_tokens": 16}'`,
  );
  return {
    url,
    async close() {
      keys?.close();
      await drainHttp(app, lifecycle, cfg.shutdownGraceMs, log);
      await coordinator?.close();
      await gateway.close();
    },
  };
}

/** Addresses only this machine can reach. */
function isLoopback(host: string): boolean {
  return host === 'localhost' || host === '::1' || /^127\.\d+\.\d+\.\d+$/.test(host) || /^::ffff:127\./i.test(host);
}

const LISTEN_BACKLOG = 4096;
/** After the grace period, how long cancelled requests get to write their error before every connection is cut. */
const CANCEL_FLUSH_MS = 1000;

/**
 * Graceful stop of the HTTP side, bounded by `graceMs` (+ CANCEL_FLUSH_MS): drain (/ready 503,
 * new requests 503), stop listening and close idle keep-alive connections, let running
 * generations finish, cancel those still running at the deadline, then cut every connection
 * left (slow uploads, clients dripping headers), so no client can hold the shutdown open.
 */
async function drainHttp(app: FastifyInstance, lifecycle: ServerLifecycle, graceMs: number, log: (line: string) => void): Promise<void> {
  lifecycle.beginDrain();
  // resolves once every connection has ended; forceCloseConnections: 'idle' closes the idle ones now
  const closed = app.close();
  // connections whose request ends during the drain are closed as they turn idle
  const sweep = setInterval(() => app.server.closeIdleConnections(), 100);
  let timer: NodeJS.Timeout | undefined;
  const deadline = new Promise<'deadline'>((resolve) => (timer = setTimeout(() => resolve('deadline'), graceMs)));
  try {
    if ((await Promise.race([closed.then(() => 'closed' as const), deadline])) === 'deadline') {
      if (lifecycle.running > 0) {
        log(`shutdown grace of ${graceMs} ms is over: cancelling ${lifecycle.running} running request(s)`);
        lifecycle.cancelInFlight();
        // their error (a JSON 503, or a stream's last event) is written right after they settle
        await Promise.race([lifecycle.whenIdle().then(() => sleep(50)), sleep(CANCEL_FLUSH_MS)]);
      }
      app.server.closeAllConnections();
      await closed;
    }
  } finally {
    clearTimeout(timer);
    clearInterval(sweep);
  }
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** A Redis URL without its password, for logs. */
function redactUrl(url: string): string {
  try {
    const u = new URL(url);
    if (u.password) u.password = '***';
    return u.toString();
  } catch {
    return 'redis';
  }
}
