/**
 * bench:step-profile — where a scheduler step's time goes (admission, prefill, repack, decode)
 * when many requests run at once on the SmolLM2-135M shape, with 1 adapter vs N distinct ones.
 * No HTTP: requests go straight to the Gateway, all submitted at t=0. Request i asks for
 * output + (i mod stagger) tokens, so with --stagger ≥ --requests one sequence finishes per
 * step and the batch's adapter set changes at every step, as under continuous batching. Each
 * adapter count runs twice: the first pass loads adapters cold, the second finds them on device.
 *
 *   npm run bench:step-profile [-- --requests 24 --adapters 1,24 --stagger 24]
 */
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import os from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { resolveBackend } from '../src/model/backend/backend.js';
import { peftConfigJson, writePeftAdapter } from '../src/model/synthetic/hf-folder-writer.js';
import { LlamaModel } from '../src/model/forward/llama-model.js';
import { llamaWeightsFromArrays, projectionModulePath, type ProjectionName } from '../src/model/architecture/llama-weights.js';
import { parseModelConfig } from '../src/model/architecture/model-config.js';
import { SMOLLM2_135M_SHAPE } from '../src/model/architecture/model-shapes.js';
import { randomLlamaWeights, randomLoraWeights } from '../src/model/synthetic/random-weights.js';
import { SeededRandom } from '../src/model/synthetic/seeded-random.js';
import type { StepInfo } from '../src/serving/continuous-batcher.js';
import { Gateway } from '../src/serving/gateway.js';

const { values: flags } = parseArgs({
  options: {
    requests: { type: 'string', default: '24' },
    adapters: { type: 'string', default: '1,24' },
    prompt: { type: 'string', default: '20' },
    output: { type: 'string', default: '20' },
    stagger: { type: 'string', default: '4' },
  },
});
const RANKS = [8, 16, 32];
const TARGETS: ProjectionName[] = ['q_proj', 'v_proj'];

class SharedModel extends LlamaModel {
  override dispose(): void {}
}

async function main(): Promise<void> {
  await resolveBackend('auto', (l) => console.log(l));
  const config = parseModelConfig(SMOLLM2_135M_SHAPE);
  const model = new LlamaModel(config, llamaWeightsFromArrays(config, randomLlamaWeights(SMOLLM2_135M_SHAPE, 7)));
  const root = await mkdtemp(join(os.tmpdir(), 'lora-gateway-step-profile-'));
  const counts = flags.adapters.split(',').map(Number);
  const n = Number(flags.requests);
  try {
    const gateway = await Gateway.create({
      modelId: 'm',
      model: new SharedModel(config, model.weights),
      tokenizer: undefined,
      storeDir: join(root, 'store'),
      deviceMemoryBytes: 512 * 2 ** 20,
      hostMemoryBytes: 1024 * 2 ** 20,
      maxLoraRank: 64,
      limits: { maxRunningSeqs: 32, maxBatchTokens: 2048, maxAdaptersPerBatch: 32, maxWaiting: 1000 },
    });
    for (let i = 0; i < Math.max(...counts); i++) {
      const r = RANKS[i % RANKS.length];
      const dir = join(root, 'src', `a${i}`);
      const mods = [];
      for (let l = 0; l < config.numLayers; l++) for (const proj of TARGETS) mods.push({ modulePath: projectionModulePath(l, proj), proj, rank: r });
      await writePeftAdapter(dir, peftConfigJson({ r, loraAlpha: 2 * r, targetModules: TARGETS, baseModelName: 'm' }), randomLoraWeights(SMOLLM2_135M_SHAPE, mods, i), 'BF16');
      await gateway.putAdapter(`a${i}`, { config: await readFile(join(dir, 'adapter_config.json')), weights: await readFile(join(dir, 'adapter_model.safetensors')) });
    }
    let steps: StepInfo[] = [];
    gateway.onStep((s) => steps.push(s));
    for (const count of [...counts, ...counts]) {
      steps = [];
      const rng = new SeededRandom(1);
      const t0 = performance.now();
      const pending: Promise<unknown>[] = [];
      for (let i = 0; i < n; i++) {
        const promptIds = Array.from({ length: Number(flags.prompt) }, () => rng.int(config.vocabSize));
        pending.push(gateway.complete({ adapterId: `a${i % count}`, promptIds, maxTokens: Number(flags.output) + (i % Number(flags.stagger)), sampling: { temperature: 0, topP: 1, topK: 0 }, ignoreEos: true }));
      }
      await Promise.all(pending);
      const wall = performance.now() - t0;
      const sum = (k: keyof StepInfo['ms'], f: (s: StepInfo) => boolean = () => true) => steps.filter(f).reduce((a, s) => a + s.ms[k], 0);
      const decodeSteps = steps.filter((s) => s.ms.decode > 0);
      const rows = decodeSteps.reduce((a, s) => a + s.running + s.finished, 0);
      console.log(
        `${count} adapters: wall ${wall.toFixed(0)} ms, steps ${steps.length}; admit ${sum('admit').toFixed(0)} prefill ${sum('prefill').toFixed(0)} repack ${sum('repack').toFixed(0)} decode ${sum('decode').toFixed(0)} ms; ` +
          `decode ${(sum('decode') / decodeSteps.length).toFixed(1)} ms/step at ${(rows / decodeSteps.length).toFixed(1)} rows (${((rows / sum('decode')) * 1000).toFixed(1)} tok/s)`,
      );
    }
    await gateway.close();
  } finally {
    model.dispose();
    await rm(root, { recursive: true, force: true });
  }
}

await main();
