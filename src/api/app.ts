import Fastify, { type FastifyInstance } from 'fastify';
import type { RoundCoordinator } from '../federation/round-coordinator.js';
import type { ServingEngine } from '../serving/serving-engine.js';
import { adapterRoutes } from './adapter-routes.js';
import { completionRoutes } from './completion-routes.js';
import { federationRoutes } from './federation-routes.js';
import { DEFAULT_STREAM_BUFFER_BYTES } from './generation-run.js';
import { handleError } from './http-errors.js';
import { opsRoutes } from './ops-routes.js';
import type { GatewayMetrics } from './metrics.js';
import { ServerLifecycle } from './server-lifecycle.js';
import { clientErrorHandler, installNotFound } from './transport-errors.js';

/** How long a connection may take over each part of a request (0 = no limit). */
export interface HttpTimeouts {
  /** From connecting (or the previous response) to the end of the request headers. */
  headerTimeoutMs: number;
  /** To receive the whole request, body included; the response may take as long as it takes. */
  requestTimeoutMs: number;
  /** An idle keep-alive connection is closed after this. */
  keepAliveTimeoutMs: number;
}

export interface AppOptions {
  engine: ServingEngine;
  metrics: GatewayMetrics;
  /** Largest request body in bytes (uploads included). */
  bodyLimitBytes?: number;
  logger?: boolean;
  /** Runs federation jobs; absent (serve without --redis): the federation routes answer 503. */
  coordinator?: RoundCoordinator;
  /** Draining and shutdown (serve drives it on SIGTERM); absent: one that never drains. */
  lifecycle?: ServerLifecycle;
  timeouts?: Partial<HttpTimeouts>;
  /** Unsent bytes a stream may hold before it is cancelled as CLIENT_TOO_SLOW. @defaultValue 64 KiB */
  streamBufferBytes?: number;
}

const DEFAULT_TIMEOUTS: HttpTimeouts = { headerTimeoutMs: 10_000, requestTimeoutMs: 300_000, keepAliveTimeoutMs: 72_000 };

/** The HTTP surface: thin routes that parse, call the engine, and reply. */
export async function buildApp(options: AppOptions): Promise<FastifyInstance> {
  const bodyLimitBytes = options.bodyLimitBytes ?? 64 * 1024 * 1024;
  const t = { ...DEFAULT_TIMEOUTS, ...options.timeouts };
  const lifecycle = options.lifecycle ?? new ServerLifecycle();
  // Node checks the header and request timeouts on a timer (30 s by default): often enough to honour them
  const checkEveryMs = Math.max(50, Math.min(1000, Math.floor(Math.min(...[t.headerTimeoutMs, t.requestTimeoutMs].filter((ms) => ms > 0), 4000) / 4)));
  const app = Fastify({
    logger: options.logger ?? false,
    bodyLimit: bodyLimitBytes,
    // adapter ids are up to 128 characters; a longer path parameter is 414 url_too_long
    routerOptions: { maxParamLength: 256 },
    requestTimeout: t.requestTimeoutMs,
    keepAliveTimeout: t.keepAliveTimeoutMs,
    http: { headersTimeout: t.headerTimeoutMs, connectionsCheckingInterval: checkEveryMs },
    // close() ends idle keep-alive connections at once; new requests while draining get our 503 (ServerLifecycle)
    forceCloseConnections: 'idle',
    return503OnClosing: false,
    frameworkErrors: handleError,
    clientErrorHandler,
  });
  app.setErrorHandler(handleError);
  installNotFound(app);
  lifecycle.install(app);
  const guards = { lifecycle, maxBufferedBytes: options.streamBufferBytes ?? DEFAULT_STREAM_BUFFER_BYTES };
  await app.register(opsRoutes, { engine: options.engine, metrics: options.metrics, lifecycle });
  await app.register(completionRoutes, { engine: options.engine, metrics: options.metrics, guards });
  await app.register(adapterRoutes, { engine: options.engine, metrics: options.metrics, uploadLimitBytes: bodyLimitBytes });
  await app.register(federationRoutes, { coordinator: options.coordinator });
  return app;
}
