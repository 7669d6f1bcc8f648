import type { FastifyPluginAsync } from 'fastify';
import type { ResolvedBackend } from '../model/backend/backend.js';
import type { ServingEngine } from '../serving/serving-engine.js';
import type { GatewayMetrics } from './metrics.js';
import type { ServerLifecycle } from './server-lifecycle.js';

/** What this process runs, for /ready and the lora_gateway_build_info gauge. */
export interface BuildInfo {
  /** package.json's version. */
  version: string;
  /** The tfjs backend running the engine: 'tensorflow', 'wasm' or 'cpu' ('unknown' before one is resolved). */
  backend: string;
  /** wasm: whether the native OpenBLAS kernels (matrix products, SGMV LoRA) are on; false elsewhere. */
  nativeBlas: boolean;
}

export function buildInfoOf(version: string, backend: ResolvedBackend | undefined): BuildInfo {
  return { version, backend: backend?.name ?? 'unknown', nativeBlas: backend?.nativeBlas === true };
}

/** /health (process up), /ready (model loaded: the engine exists once it is; 503 once draining), /metrics. */
export const opsRoutes: FastifyPluginAsync<{ engine: ServingEngine; metrics: GatewayMetrics; build: BuildInfo; lifecycle?: ServerLifecycle }> = async (
  app,
  { engine, metrics, build, lifecycle },
) => {
  metrics.reportBuild(build);
  app.get('/health', async () => ({ status: 'ok' }));
  app.get('/ready', async (_req, reply) => {
    const about = { model: engine.modelId, backend: build.backend, native_blas: build.nativeBlas, version: build.version };
    if (lifecycle?.draining) return reply.status(503).send({ status: 'draining', ...about });
    return { status: 'ready', ...about };
  });
  app.get('/metrics', async (_req, reply) => {
    void reply.header('content-type', metrics.registry.contentType);
    return metrics.registry.metrics();
  });
};
