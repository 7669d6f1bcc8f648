import Fastify, { type FastifyInstance } from 'fastify';
import type { RoundCoordinator } from '../federation/round-coordinator.js';
import type { ServingEngine } from '../serving/serving-engine.js';
import type { ApiKeyRing } from '../tenants/api-key-file.js';
import { adapterRoutes } from './adapter-routes.js';
import { engineResolver, registerAuthentication } from './authentication.js';
import { completionRoutes } from './completion-routes.js';
import { federationRoutes } from './federation-routes.js';
import { errorBody, handleError } from './http-errors.js';
import { LoraPathPolicy } from './lora-path-policy.js';
import { opsRoutes } from './ops-routes.js';
import type { GatewayMetrics } from './metrics.js';

export interface AppOptions {
  engine: ServingEngine;
  metrics: GatewayMetrics;
  /** Largest request body in bytes (uploads included). */
  bodyLimitBytes?: number;
  logger?: boolean;
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
  const app = Fastify({ logger: options.logger ?? false, bodyLimit: bodyLimitBytes });
  app.setErrorHandler(handleError);
  app.setNotFoundHandler((req, reply) => {
    void reply.status(404).send(errorBody('not_found', `no route ${req.method} ${req.url}`));
  });
  registerAuthentication(app, { keys: options.apiKeys ?? (() => undefined), metricsPublic: options.metricsPublic ?? false });
  const engineFor = engineResolver(options.engine);
  await app.register(opsRoutes, { engine: options.engine, metrics: options.metrics });
  await app.register(completionRoutes, { engine: options.engine, engineFor, metrics: options.metrics });
  await app.register(adapterRoutes, { engineFor, metrics: options.metrics, uploadLimitBytes: bodyLimitBytes, loraPaths: options.loraPaths ?? (await LoraPathPolicy.create(undefined)) });
  await app.register(federationRoutes, { coordinator: options.coordinator });
  return app;
}
