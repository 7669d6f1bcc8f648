import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { FastifyInstance } from 'fastify';
import { buildApp, type AppOptions } from '../../src/api/app.js';
import { GatewayMetrics } from '../../src/api/metrics.js';
import { writeDemoModel } from '../../src/cli/demo-model-command.js';
import { loadLlamaModel } from '../../src/model/forward/model-loader.js';
import { TextTokenizer } from '../../src/model/tokenizer/tokenizer.js';
import { Gateway, type GatewayOptions } from '../../src/serving/gateway.js';
import { useWasm } from './tiny-models.js';

export interface GatewayFixture {
  gateway: Gateway;
  app: FastifyInstance;
  /** http://127.0.0.1:PORT of the listening server. */
  baseUrl: string;
  /** Folder of the demo model; its adapters are in `${modelDir}/adapters/demo-<i>`. */
  modelDir: string;
  close(): Promise<void>;
}

/**
 * A real gateway over a real socket: the demo model (real HF files) with `adapters` PEFT
 * adapters registered as demo-0 … demo-N-1, served by Fastify on an ephemeral loopback port.
 */
export async function startGateway(adapters = 4, over: Partial<GatewayOptions> = {}, http: Omit<AppOptions, 'engine' | 'metrics'> = {}): Promise<GatewayFixture> {
  await useWasm();
  const root = await mkdtemp(join(tmpdir(), 'lora-gateway-http-'));
  const modelDir = join(root, 'model');
  await writeDemoModel(modelDir, { adapters });
  const gateway = await Gateway.create({
    modelId: 'demo-model',
    model: await loadLlamaModel(modelDir),
    tokenizer: await TextTokenizer.load(modelDir),
    storeDir: join(root, 'store'),
    deviceMemoryBytes: 64 * 1024 * 1024,
    hostMemoryBytes: 64 * 1024 * 1024,
    maxLoraRank: 64,
    limits: { maxRunningSeqs: 32, maxBatchTokens: 2048, maxAdaptersPerBatch: 32, maxWaiting: 256 },
    ...over,
  });
  for (let i = 0; i < adapters; i++) await gateway.loadAdapterFromDir(`demo-${i}`, join(modelDir, 'adapters', `demo-${i}`));
  const app = await buildApp({ engine: gateway, metrics: new GatewayMetrics(gateway), ...http });
  const baseUrl = await app.listen({ host: '127.0.0.1', port: 0 });
  return {
    gateway,
    app,
    baseUrl,
    modelDir,
    async close() {
      await app.close();
      await gateway.close();
      await rm(root, { recursive: true, force: true });
    },
  };
}
