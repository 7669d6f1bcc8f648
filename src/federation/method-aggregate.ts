import { Worker } from 'node:worker_threads';
import { extname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { errorFromWire, type WireError } from '../errors.js';
import { aggregateFedavg } from './aggregators/fedavg.js';
import { aggregateFedsb } from './aggregators/fedsb.js';
import { aggregateFfa } from './aggregators/ffa.js';
import { aggregateFlora } from './aggregators/flora.js';
import type { ClientUpdate } from './aggregators/client-update.js';
import { ruledAverage, ruledFlora, type ClientDpRule, type RobustRule, type RuleStats } from './aggregators/ruled-aggregate.js';
import { toServedAdapter } from './aggregators/served-adapter.js';
import type { FactorSet, FedMethod } from './lora-factors.js';

export interface MethodAggregateInput {
  method: FedMethod;
  lora: { alpha: number; useRslora: boolean; r: number };
  maxLoraRank: number;
  /** The global state the round started from. */
  previous: FactorSet;
  /** Accepted updates; `scale` is the client's LoRA scale (FLoRA folds it into the stack). */
  updates: (ClientUpdate & { scale: number })[];
  /** Robust aggregation (job spec `robust`). */
  robust?: RobustRule;
  /** Client-level differential privacy (job spec `dp`, level `client`). */
  dp?: ClientDpRule;
}

export interface MethodAggregateResult {
  /** The next round's global state. */
  next: FactorSet;
  /** The PEFT files to publish. */
  served: { config: Buffer; weights: Buffer };
  stats: { aggregationError?: number; keptFraction?: number; rank: number; rules?: RuleStats };
}

/** The method's aggregate: the next global state, the PEFT files to serve, round statistics. */
export function aggregateMethod({ method, lora, maxLoraRank, previous, updates, robust, dp }: MethodAggregateInput): MethodAggregateResult {
  if (robust || dp) {
    if (method === 'flora') {
      const { global, keptFraction, rank, stats } = ruledFlora(previous.size > 0 ? previous : undefined, updates, maxLoraRank, robust, dp);
      return { next: global, served: toServedAdapter('flora', global, lora), stats: { keptFraction, rank, rules: stats } };
    }
    const { next, stats } = ruledAverage(method, previous, updates, robust, dp);
    return { next, served: toServedAdapter(method, next, lora), stats: { rank: lora.r, rules: stats } };
  }
  if (method === 'fedavg') {
    const { global, relativeError } = aggregateFedavg(previous, updates);
    return { next: global, served: toServedAdapter('fedavg', global, lora), stats: { aggregationError: relativeError, rank: lora.r } };
  }
  if (method === 'ffa') {
    const { global } = aggregateFfa(previous, updates);
    return { next: global, served: toServedAdapter('ffa', global, lora), stats: { rank: lora.r } };
  }
  if (method === 'flora') {
    const { global, keptFraction, rank } = aggregateFlora(previous.size > 0 ? previous : undefined, updates, maxLoraRank);
    return { next: global, served: toServedAdapter('flora', global, lora), stats: { keptFraction, rank } };
  }
  const { global } = aggregateFedsb(previous, updates);
  return { next: global, served: toServedAdapter('fedsb', global, lora), stats: { rank: lora.r } };
}

/** The worker script next to this file (.ts under tsx, .js once built). */
const WORKER = new URL(`./aggregation-worker${extname(fileURLToPath(import.meta.url))}`, import.meta.url);

type WorkerReply = { ok: MethodAggregateResult } | { error: WireError };

/**
 * aggregateMethod in a worker thread. The gateway process also serves requests: FLoRA's
 * truncated SVD or a Fed-SB average over a large model takes seconds to minutes of CPU, which
 * on the event loop would stall every stream. Inputs and results cross by structured clone
 * (typed arrays are copied once each way); errors keep their code and reason.
 */
export function aggregateOffThread(input: MethodAggregateInput): Promise<MethodAggregateResult> {
  return new Promise((resolve, reject) => {
    // from source (tests, `node --import tsx`) the worker registers tsx's loader itself first:
    // module hooks do not carry over into worker threads
    const worker = WORKER.pathname.endsWith('.ts')
      ? new Worker(`import('tsx/esm/api').then((m) => { m.register(); return import(${JSON.stringify(WORKER.href)}); })`, { eval: true, workerData: input })
      : new Worker(WORKER, { workerData: input });
    let settled = false;
    worker.once('message', (reply: WorkerReply) => {
      settled = true;
      void worker.terminate();
      if ('ok' in reply) {
        const { config, weights } = reply.ok.served;
        // Buffers arrive as plain Uint8Arrays
        resolve({ ...reply.ok, served: { config: Buffer.from(config.buffer, config.byteOffset, config.byteLength), weights: Buffer.from(weights.buffer, weights.byteOffset, weights.byteLength) } });
      } else {
        reject(errorFromWire(reply.error));
      }
    });
    worker.once('error', (err) => {
      if (!settled) reject(err);
    });
    worker.once('exit', (code) => {
      if (!settled) reject(new Error(`aggregation worker exited with code ${code} before answering`));
    });
  });
}
