import type { WireError } from '../errors.js';
import type { BackendChoice, ResolvedBackend } from '../model/backend/backend.js';
import type { LoraStrategy } from '../model/lora/lora-batch.js';
import type { AdapterResidence } from '../pager/adapter-pager.js';
import type { AdapterRecord } from '../pager/adapter-store.js';
import type { GenerationResult } from './batch-generator.js';
import type { BatcherLimits, StepInfo } from './batcher-options.js';
import type { CompletionRequest, EngineStats, TokenEvent } from './serving-engine.js';

/**
 * Messages between the ThreadedGateway (API thread) and its engine worker thread. The worker
 * owns the tensor backend, the model, the pager and the batcher; the API thread owns HTTP and
 * the adapter store, and sends each request with the adapter record it resolved.
 */
export interface EngineWorkerInit {
  modelDir: string;
  backend: BackendChoice;
  storeDir: string;
  maxLoraRank: number;
  stopTokenIds: number[];
  deviceMemoryBytes: number;
  hostMemoryBytes: number;
  limits: BatcherLimits;
  loraStrategy?: LoraStrategy;
}

export type WireRequest = Omit<CompletionRequest, 'signal'>;

export type ToEngine =
  | { type: 'submit'; id: number; request: WireRequest; record: AdapterRecord | null }
  | { type: 'cancel'; id: number }
  | { type: 'retire'; id: number; adapterId: string; versions: AdapterRecord[] }
  /** Versions pruned from disk (--keep-versions): drop them from host and device, no reply. */
  | { type: 'forget'; versions: AdapterRecord[] }
  | { type: 'close' };

/** Pager residences of versions not only on disk, keyed `id@version`. */
export type ResidenceView = { key: string; residence: AdapterResidence; error?: string }[];

export type FromEngine =
  | { type: 'log'; line: string }
  | { type: 'ready'; poolCapacity: number; stats: EngineStats; backend?: ResolvedBackend }
  | { type: 'failed'; error: WireError }
  | { type: 'token'; id: number; event: TokenEvent }
  | { type: 'done'; id: number; result: GenerationResult }
  | { type: 'error'; id: number; error: WireError }
  | { type: 'step'; info: StepInfo; stats: EngineStats; residences?: ResidenceView }
  | { type: 'state'; stats: EngineStats; residences: ResidenceView }
  | { type: 'adapterLoad'; seconds: number }
  | { type: 'retired'; id: number; residences: ResidenceView }
  | { type: 'closed' };
