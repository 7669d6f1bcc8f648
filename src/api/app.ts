import Fastify, { type FastifyInstance } from 'fastify';
import type { RoundCoordinator } from '../federation/round-coordinator.js';
import type { ServingEngine } from '../serving/serving-engine.js';
import { adapterRoutes } from './adapter-routes.js';
import { completionRoutes } from './completion-routes.js';
import { federationRoutes } from './federation-routes.js';
import { errorBody, handleError } from './http-errors.js';
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
}

/** The HTTP surface: thin routes that parse, call the engine, and reply. */
export async function buildApp(options: AppOptions): Promise<FastifyInstance> {
  const bodyLimitBytes = options.bodyLimitBytes ?? 64 * 1024 * 1024;
  const app = Fastify({ logger: options.logger ?? false, bodyLimit: bodyLimitBytes });
  app.setErrorHandler(handleError);
  app.setNotFoundHandler((req, reply) => {
    void reply.status(404).send(errorBody('not_found', `no route ${req.method} ${req.url}`));
  });
  await app.register(opsRoutes, { engine: options.engine, metrics: options.metrics });
  await app.register(completionRoutes, { engine: options.engine, metrics: options.metrics });
  await app.register(adapterRoutes, { engine: options.engine, metrics: options.metrics, uploadLimitBytes: bodyLimitBytes });
  await app.register(federationRoutes, { coordinator: options.coordinator });
  return app;
}
