import { existsSync } from 'node:fs';
import type { FastifyInstance } from 'fastify';
import { readdir } from 'node:fs/promises';
import { basename, join, resolve } from 'node:path';
import { LoraGatewayError } from '../errors.js';
import { buildApp } from '../api/app.js';
import { FederationMetrics } from '../api/federation-metrics.js';
import { GatewayMetrics } from '../api/metrics.js';
import { ServerLifecycle } from '../api/server-lifecycle.js';
import type { EngineConfig, ServeConfig } from '../config.js';
import { resolveBackend } from '../model/backend/backend.js';
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
  log: (line: string) => void;
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
  const { serve: cfg, engine, log } = options;
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
    limits: {
      maxRunningSeqs: cfg.maxRunningSeqs,
      maxBatchTokens: cfg.maxBatchTokens,
      maxAdaptersPerBatch: cfg.maxAdaptersPerBatch,
      maxWaiting: cfg.maxWaiting,
    },
  };
  let gateway: Gateway | ThreadedGateway;
  if (cfg.engineThread) {
    // the engine (backend, model, batcher) on its own thread; HTTP stays on this event loop
    gateway = await ThreadedGateway.create({ ...common, modelDir, model: await readModelConfig(modelDir), backend: engine.backend, log });
    log('engine: on its own worker thread (HTTP never waits for a step)');
  } else {
    await resolveBackend(engine.backend, log);
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
  const app = await buildApp({ engine: gateway, metrics, bodyLimitBytes: cfg.bodyLimitBytes, coordinator, lifecycle, timeouts });
  let url: string;
  try {
    // a burst of connections waits in the kernel's accept queue rather than being refused (Node's default is 511; the kernel caps it at somaxconn)
    url = await app.listen({ host: cfg.host, port: cfg.port, backlog: LISTEN_BACKLOG });
  } catch (err) {
    // the engine thread and the federation queues are up: stop them, then say why in one line
    await app.close().catch(() => undefined);
    await coordinator?.close().catch(() => undefined);
    await gateway.close().catch(() => undefined);
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
      await drainHttp(app, lifecycle, cfg.shutdownGraceMs, log);
      await coordinator?.close();
      await gateway.close();
    },
  };
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
