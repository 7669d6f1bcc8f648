import type { SamplingParams } from './sampler.js';
import type { GenerationResult, ScoredToken } from './batch-generator.js';
import type { AdapterResidence } from '../pager/adapter-pager.js';
import type { StepInfo } from './batcher-options.js';
import type { AdapterRecord, AdapterFiles, PutOptions } from '../pager/adapter-store.js';
import type { ModelConfig } from '../model/architecture/model-config.js';
import type { TextTokenizer } from '../model/tokenizer/tokenizer.js';

/**
 * What the HTTP layer asks of the serving side. The API parses and validates HTTP, turns
 * text into token ids with `tokenizer`, and calls these; everything about batching, paging
 * and adapter residency stays behind this interface.
 */
export interface CompletionRequest {
  /** null = the base model. */
  adapterId: string | null;
  promptIds: number[];
  maxTokens: number;
  sampling: SamplingParams;
  /** Top-N logprobs per generated token (0..20); undefined = none requested. */
  logprobs?: number;
  echo?: boolean;
  ignoreEos?: boolean;
  /** Aborting cancels the request; its pages are freed at the next step. */
  signal?: AbortSignal;
}

export interface TokenEvent {
  /** The generated token with its logprob and top alternatives (top is empty unless requested). */
  token: ScoredToken;
}

/** Point-in-time numbers for metrics. */
export interface EngineStats {
  running: number;
  waiting: number;
  pages: { kv: number; adapter: number; capacity: number };
  /** Cumulative counts from the adapter pager. */
  pager: { hostHits: number; hostMisses: number; deviceLoads: number; deviceEvictions: number; hostEvictions: number };
  /** Live tensors on the engine's backend (tf.memory().numTensors): flat under steady load, or something leaks. */
  tensors?: number;
}

export interface ServingEngine {
  readonly modelId: string;
  readonly model: ModelConfig;
  readonly tokenizer: TextTokenizer | undefined;
  /**
   * Runs one request to completion, calling onToken for each generated token as it is
   * sampled. Rejects with a LoraGatewayError: ADAPTER_NOT_FOUND, REQUEST_INVALID,
   * CONTEXT_LENGTH_EXCEEDED, QUEUE_FULL (→ HTTP 429), REQUEST_CANCELLED.
   */
  complete(request: CompletionRequest, onToken?: (event: TokenEvent) => void): Promise<GenerationResult>;
  listAdapters(): AdapterRecord[];
  getAdapter(id: string): AdapterRecord | undefined;
  /**
   * Validates fully, then stores a new version (with `options.provenance` in its manifest);
   * in-flight requests finish on the old one.
   */
  putAdapter(id: string, files: AdapterFiles, options?: PutOptions): Promise<AdapterRecord>;
  /** One stored version's record (the latest when `version` is omitted); undefined when it does not exist. */
  getAdapterVersion(id: string, version?: number): Promise<AdapterRecord | undefined>;
  /** A stored version's two files, checked against its manifest (ADAPTER_WEIGHTS_INVALID when they differ). */
  readAdapterFiles(record: AdapterRecord): Promise<AdapterFiles>;
  /** The newest version of an id whose record satisfies `predicate` (e.g. a provenance match); undefined when none. */
  findAdapterVersion(id: string, predicate: (record: AdapterRecord) => boolean): Promise<AdapterRecord | undefined>;
  /** Waits for in-flight requests on the adapter, then removes it. */
  deleteAdapter(id: string): Promise<AdapterRecord>;
  /** Registers an adapter folder on disk (vLLM's load_lora_adapter). */
  loadAdapterFromDir(id: string, dir: string): Promise<AdapterRecord>;
  /** Where an adapter version lives now. */
  residence(record: AdapterRecord): AdapterResidence;
  /** Why an 'errored' version could not be loaded. */
  loadError(record: AdapterRecord): string | undefined;
  stats(): EngineStats;
  /** Called after every scheduler step with the batch it ran. */
  onStep(listener: (info: StepInfo) => void): void;
  /** Reports how long each adapter load onto the device took, in seconds. */
  onAdapterLoad(listener: (seconds: number) => void): void;
  close(): Promise<void>;
}
