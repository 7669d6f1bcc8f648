import { join } from 'node:path';
import { readModelConfig } from '../../src/model/architecture/model-config.js';
import { TextTokenizer } from '../../src/model/tokenizer/tokenizer.js';
import { ThreadedGateway, type ThreadedGatewayOptions } from '../../src/serving/threaded-gateway.js';

/** A ThreadedGateway on the wasm backend over the demo model in `modelDir`, its store in `root/store`. */
export async function startThreaded(root: string, modelDir: string, limits: ThreadedGatewayOptions['limits'], over: Partial<ThreadedGatewayOptions> = {}): Promise<ThreadedGateway> {
  return ThreadedGateway.create({
    modelId: 'demo-model',
    modelDir,
    model: await readModelConfig(modelDir),
    tokenizer: await TextTokenizer.load(modelDir),
    backend: 'wasm',
    storeDir: join(root, 'store'),
    deviceMemoryBytes: 64 * 2 ** 20,
    hostMemoryBytes: 64 * 2 ** 20,
    maxLoraRank: 64,
    limits,
    ...over,
  });
}
