import type { FastifyPluginAsync } from 'fastify';
import type { ServingEngine } from '../serving/serving-engine.js';
import type { GatewayMetrics } from './metrics.js';

/** /health (process up), /ready (model loaded: the engine exists once it is), /metrics. */
export const opsRoutes: FastifyPluginAsync<{ engine: ServingEngine; metrics: GatewayMetrics }> = async (app, { engine, metrics }) => {
  app.get('/health', async () => ({ status: 'ok' }));
  app.get('/ready', async () => ({ status: 'ready', model: engine.modelId }));
  app.get('/metrics', async (_req, reply) => {
    void reply.header('content-type', metrics.registry.contentType);
    return metrics.registry.metrics();
  });
};
