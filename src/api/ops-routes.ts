import type { FastifyPluginAsync } from 'fastify';
import type { ServingEngine } from '../serving/serving-engine.js';
import type { GatewayMetrics } from './metrics.js';
import type { ServerLifecycle } from './server-lifecycle.js';

/** /health (process up), /ready (model loaded: the engine exists once it is; 503 once draining), /metrics. */
export const opsRoutes: FastifyPluginAsync<{ engine: ServingEngine; metrics: GatewayMetrics; lifecycle?: ServerLifecycle }> = async (app, { engine, metrics, lifecycle }) => {
  app.get('/health', async () => ({ status: 'ok' }));
  app.get('/ready', async (_req, reply) => {
    if (lifecycle?.draining) return reply.status(503).send({ status: 'draining', model: engine.modelId });
    return { status: 'ready', model: engine.modelId };
  });
  app.get('/metrics', async (_req, reply) => {
    void reply.header('content-type', metrics.registry.contentType);
    return metrics.registry.metrics();
  });
};
