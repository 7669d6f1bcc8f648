import Fastify, { LogController, type FastifyBaseLogger, type FastifyInstance, type FastifyReply } from 'fastify';
import type { RoundCoordinator } from '../federation/round-coordinator.js';
import type { ServingEngine } from '../serving/serving-engine.js';
import type { ApiKeyRing } from '../tenants/api-key-file.js';
import { adapterRoutes } from './adapter-routes.js';
import { engineResolver, registerAuthentication } from './authentication.js';
import { completionRoutes } from './completion-routes.js';
import { federationRoutes } from './federation-routes.js';
import { errorBody, handleError } from './http-errors.js';
import { LoraPathPolicy } from './lora-path-policy.js';
import { resolvedBackend } from '../model/backend/backend.js';
import { packageVersion } from '../package-version.js';
import { buildInfoOf, opsRoutes, type BuildInfo } from './ops-routes.js';
import type { GatewayMetrics } from './metrics.js';
import { METERED } from './completion-routes.js';
import { logRequest, routeOf, whenRequestEnds } from './request-log.js';

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
}

/** The HTTP surface: thin routes that parse, call the engine, and reply. */
export async function buildApp(options: AppOptions): Promise<FastifyInstance> {
  const bodyLimitBytes = options.bodyLimitBytes ?? 64 * 1024 * 1024;
  const logger = options.logger ?? false;
  const app = Fastify({
    ...(typeof logger === 'boolean' ? { logger } : { loggerInstance: logger }),
    // one line per request from whenRequestEnds below instead of Fastify's pair of lines
    logController: new LogController({ disableRequestLogging: true }),
    bodyLimit: bodyLimitBytes,
    // errors Fastify raises before routing (a bad URL encoding, an over-long path parameter)
    // bypass the error handler: OpenAI-shaped like every other error
    frameworkErrors: (err, _req, reply) => void (reply as FastifyReply).status(err.statusCode ?? 400).send(errorBody(err.code ?? 'request_invalid', err.message)),
  }) as unknown as FastifyInstance;
  whenRequestEnds(app, (req, reply, aborted) => {
    // inference routes are counted by their RequestMeter, which knows a stream's real outcome
    if (!Object.hasOwn(METERED, req.routeOptions.url ?? '')) options.metrics.requests.inc({ route: routeOf(req), status: String(aborted ? 499 : reply.statusCode) });
    if (logger !== false) logRequest(req.log, req, reply, aborted);
  });
  app.setErrorHandler(handleError);
  app.setNotFoundHandler((req, reply) => {
    void reply.status(404).send(errorBody('not_found', `no route ${req.method} ${req.url}`));
  });
  registerAuthentication(app, { keys: options.apiKeys ?? (() => undefined), metricsPublic: options.metricsPublic ?? false });
  const engineFor = engineResolver(options.engine);
  // in-process engines resolved their backend on this thread; serve passes the engine thread's
  await app.register(opsRoutes, { engine: options.engine, metrics: options.metrics, build: options.build ?? buildInfoOf(packageVersion(), resolvedBackend()) });
  await app.register(completionRoutes, { engine: options.engine, engineFor, metrics: options.metrics });
  await app.register(adapterRoutes, { engineFor, metrics: options.metrics, uploadLimitBytes: bodyLimitBytes, loraPaths: options.loraPaths ?? (await LoraPathPolicy.create(undefined)) });
  await app.register(federationRoutes, { coordinator: options.coordinator, modelId: options.engine.modelId });
  return app;
}
