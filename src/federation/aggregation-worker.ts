import { parentPort, workerData } from 'node:worker_threads';
import { errorToWire } from '../errors.js';
import { aggregateMethod, type MethodAggregateInput } from './method-aggregate.js';

// Runs one round's aggregate off the gateway's event loop (see aggregateOffThread).
try {
  parentPort!.postMessage({ ok: aggregateMethod(workerData as MethodAggregateInput) });
} catch (err) {
  parentPort!.postMessage({ error: errorToWire(err) });
}
