import { parentPort, workerData } from 'node:worker_threads';
import { LoraGatewayError, UpdateRejectedError } from '../errors.js';
import { aggregateMethod, type MethodAggregateInput } from './method-aggregate.js';

// Runs one round's aggregate off the gateway's event loop (see aggregateOffThread).
try {
  parentPort!.postMessage({ ok: aggregateMethod(workerData as MethodAggregateInput) });
} catch (err) {
  const e = err as Error;
  parentPort!.postMessage({
    error: { message: e.message, ...(err instanceof LoraGatewayError ? { code: err.code } : {}), ...(err instanceof UpdateRejectedError ? { reason: err.reason } : {}) },
  });
}
