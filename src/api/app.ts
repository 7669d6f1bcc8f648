import Fastify, { LogController, type FastifyBaseLogger, type FastifyInstance } from 'fastify';
import type { RoundCoordinator } from '../federation/round-coordinator.js';
import type { ServingEngine } from '../serving/serving-engine.js';
import type { ApiKeyRing } from '../tenants/api-key-file.js';
import { adapterRoutes } from './adapter-routes.js';
import { engineResolver, registerAuthentication } from './authentication.js';
import { completionRoutes } from './completion-routes.js';
import { federationRoutes } from './federation-routes.js';
import { DEFAULT_STREAM_BUFFER_BYTES } from './generation-run.js';
import { handleError } from './http-errors.js';
import { LoraPathPolicy } from './lora-path-policy.js';
import { resolvedBackend } from '../model/backend/backend.js';
import { packageVersion } from '../package-version.js';
import { buildInfoOf, opsRoutes, type BuildInfo } from './ops-routes.js';
import type { GatewayMetrics } from './metrics.js';
import { METERED } from './completion-routes.js';
import { logRequest, routeOf, whenRequestEnds } from './request-log.js';
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
  /**
   * `serve` passes its pino logger: each request then logs one line (request-log.ts). false
   * (tests): no logging. @defaultValue false
   */
  logger?: boolean | FastifyBaseLogger;
  /** What /ready and lora_gateway_build_info report: version and tensor backend. */
  build?: BuildInfo;
  /** Runs federation jobs; absent (serve without --redis): the federation routes answer 503. */
  coordinator?: RoundCoordinator;
  /** The keys in force (read again on SIGHUP); absent or returning undefined: the server runs open. */
  apiKeys?: () => ApiKeyRing | undefined;
  /** /metrics without a key. @defaultValue false */
  metricsPublic?: boolean;
  /** Folders load_lora_adapter may read; absent: runtime loading from folders is off. */
  loraPaths?: LoraPathPolicy;
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
  const logger = options.logger ?? false;
  const t = { ...DEFAULT_TIMEOUTS, ...options.timeouts };
  const lifecycle = options.lifecycle ?? new ServerLifecycle();
  // Node checks the header and request timeouts on a timer (30 s by default): often enough to honour them
  const checkEveryMs = Math.max(50, Math.min(1000, Math.floor(Math.min(...[t.headerTimeoutMs, t.requestTimeoutMs].filter((ms) => ms > 0), 4000) / 4)));
  const app = Fastify({
    ...(typeof logger === 'boolean' ? { logger } : { loggerInstance: logger }),
    // one line per request from whenRequestEnds below instead of Fastify's pair of lines
    logController: new LogController({ disableRequestLogging: true }),
    bodyLimit: bodyLimitBytes,
    // adapter ids are up to 128 characters (a tenant's store id up to 193); a longer path parameter is 414 url_too_long
    routerOptions: { maxParamLength: 256 },
    requestTimeout: t.requestTimeoutMs,
    keepAliveTimeout: t.keepAliveTimeoutMs,
    http: { headersTimeout: t.headerTimeoutMs, connectionsCheckingInterval: checkEveryMs },
    // close() ends idle keep-alive connections at once; new requests while draining get our 503 (ServerLifecycle)
    forceCloseConnections: 'idle',
    return503OnClosing: false,
    // errors Fastify raises before routing (a bad URL encoding, an over-long path parameter) and
    // Node's parser errors: OpenAI-shaped with our codes like every other error
    frameworkErrors: handleError,
    clientErrorHandler,
  }) as unknown as FastifyInstance;
  whenRequestEnds(app, (req, reply, aborted) => {
    // inference routes are counted by their RequestMeter, which knows a stream's real outcome
    if (!Object.hasOwn(METERED, req.routeOptions.url ?? '')) options.metrics.requests.inc({ route: routeOf(req), status: String(aborted ? 499 : reply.statusCode) });
    if (logger !== false) logRequest(req.log, req, reply, aborted);
  });
  app.setErrorHandler(handleError);
  installNotFound(app);
  lifecycle.install(app);
  registerAuthentication(app, { keys: options.apiKeys ?? (() => undefined), metricsPublic: options.metricsPublic ?? false });
  const engineFor = engineResolver(options.engine);
  const guards = { lifecycle, maxBufferedBytes: options.streamBufferBytes ?? DEFAULT_STREAM_BUFFER_BYTES };
  // in-process engines resolved their backend on this thread; serve passes the engine thread's
  await app.register(opsRoutes, { engine: options.engine, metrics: options.metrics, build: options.build ?? buildInfoOf(packageVersion(), resolvedBackend()), lifecycle });
  await app.register(completionRoutes, { engine: options.engine, engineFor, metrics: options.metrics, guards });
  await app.register(adapterRoutes, { engineFor, metrics: options.metrics, uploadLimitBytes: bodyLimitBytes, loraPaths: options.loraPaths ?? (await LoraPathPolicy.create(undefined)) });
  await app.register(federationRoutes, { coordinator: options.coordinator, modelId: options.engine.modelId });
  return app;
}
