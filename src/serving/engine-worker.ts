import { parentPort, workerData } from 'node:worker_threads';
import { errorToWire } from '../errors.js';
import { resolveBackend, type ResolvedBackend } from '../model/backend/backend.js';
import { loadLlamaModel } from '../model/forward/model-loader.js';
import { describeLoraCostModel, measureLoraCostModel } from '../model/lora/lora-cost-model.js';
import { storedAdapterReader, type AdapterRecord } from '../pager/adapter-store.js';
import { EngineCore } from './engine-core.js';
import type { EngineWorkerInit, FromEngine, ToEngine } from './engine-protocol.js';
import type { EngineStats } from './serving-engine.js';

// The engine thread of a ThreadedGateway: it owns the tensor backend and runs the scheduler's
// steps, so the API thread's event loop never waits for compute (see threaded-gateway.ts).
// Messages that arrive during a step are delivered when the step yields, i.e. at the next
// step boundary, where the batcher admits whatever has arrived.
const port = parentPort!;
const init = workerData as EngineWorkerInit;
const post = (m: FromEngine) => port.postMessage(m);
// the batcher looks the adapter up by id when a request is submitted: it finds the record the
// API thread resolved for that request
const records = new Map<string, AdapterRecord>();

async function start(): Promise<{ core: EngineCore; backend: ResolvedBackend }> {
  const backend = await resolveBackend(init.backend, (line) => post({ type: 'log', line }));
  const model = await loadLlamaModel(init.modelDir);
  const loraCost = measureLoraCostModel();
  post({ type: 'log', line: `LoRA cost model measured on this backend: ${describeLoraCostModel(loraCost)}` });
  const core = new EngineCore({
    model,
    reader: storedAdapterReader(init.storeDir, model.config, init.maxLoraRank),
    records,
    stopTokenIds: init.stopTokenIds,
    deviceMemoryBytes: init.deviceMemoryBytes,
    hostMemoryBytes: init.hostMemoryBytes,
    limits: init.limits,
    loraStrategy: init.loraStrategy,
    loraCost,
  });
  return { core, backend };
}

function serveMessages(core: EngineCore): void {
  const cancels = new Map<number, AbortController>();
  // residences are sent only when the pager may have moved something: every move into or out
  // of a tier (or a failed read) counts in its counters (a delete's forgetting answers `retire`)
  let sent: EngineStats['pager'] | undefined;
  const residences = () => core.pager.residences();
  core.onStep((info) => {
    const stats = core.stats();
    const p = stats.pager;
    const moved = !sent || p.hostMisses !== sent.hostMisses || p.deviceLoads !== sent.deviceLoads || p.deviceEvictions !== sent.deviceEvictions || p.hostEvictions !== sent.hostEvictions;
    sent = p;
    post({ type: 'step', info, stats, ...(moved ? { residences: residences() } : {}) });
  });
  core.onAdapterLoad((seconds) => post({ type: 'adapterLoad', seconds }));
  port.on('message', (m: ToEngine) => {
    switch (m.type) {
      case 'submit': {
        const abort = new AbortController();
        cancels.set(m.id, abort);
        if (m.record) records.set(m.record.id, m.record);
        core
          .complete({ ...m.request, signal: abort.signal }, (event) => post({ type: 'token', id: m.id, event }))
          .then(
            (result) => post({ type: 'done', id: m.id, result }),
            (err: unknown) => {
              // a failed request may have marked its adapter errored (files fail their checks, logits not
              // finite) without the pager's counters moving: residences go first, so a GET after the error sees it
              post({ type: 'state', stats: core.stats(), residences: residences() });
              post({ type: 'error', id: m.id, error: errorToWire(err) });
            },
          )
          .finally(() => cancels.delete(m.id));
        break;
      }
      case 'cancel':
        cancels.get(m.id)?.abort();
        break;
      case 'retire':
        core.retire(m.adapterId, m.versions).then(
          () => {
            records.delete(m.adapterId);
            post({ type: 'retired', id: m.id, residences: residences() });
          },
          () => post({ type: 'retired', id: m.id, residences: residences() }),
        );
        break;
      case 'forget':
        core.forgetUnpinned(m.versions);
        break;
      case 'close':
        core.close();
        post({ type: 'closed' });
        port.close();
        break;
    }
  });
}

start().then(
  ({ core, backend }) => {
    serveMessages(core);
    post({ type: 'ready', poolCapacity: core.pool.capacity, stats: core.stats(), backend });
  },
  (err: unknown) => post({ type: 'failed', error: errorToWire(err) }),
);
