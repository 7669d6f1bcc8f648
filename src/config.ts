import { z } from 'zod';
import { ConfigError } from './errors.js';

/** pino's levels, most severe first; `silent` writes nothing. */
export const LOG_LEVELS = ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'] as const;
export type LogLevel = (typeof LOG_LEVELS)[number];

/**
 * The engine's one configuration object: read from flags and environment in one place
 * (the CLI), validated once here, frozen, and passed down.
 */
const engineConfigSchema = z
  .object({
    /** Tensor backend: auto = tfjs-node-gpu, then tfjs-node, then wasm. @defaultValue 'auto' */
    backend: z.enum(['auto', 'tensorflow', 'wasm', 'cpu']).default('auto'),
    /** Largest LoRA rank an adapter may have (vLLM's max_lora_rank). @defaultValue 64 */
    maxLoraRank: z.number().int().positive().max(1024).default(64),
    /** How the batched LoRA op runs: chosen per module by cost, or forced. @defaultValue 'auto' */
    loraStrategy: z.enum(['auto', 'stacked', 'segmented']).default('auto'),
  })
  .strict();

export type EngineConfig = Readonly<z.infer<typeof engineConfigSchema>>;

/** Validates once (undefined = use the default) and freezes. */
function parseWith<S extends z.ZodTypeAny>(schema: S, input: Record<string, unknown>): Readonly<z.infer<S>> {
  const clean = Object.fromEntries(Object.entries(input).filter(([, v]) => v !== undefined));
  const parsed = schema.safeParse(clean);
  if (!parsed.success) {
    const issue = parsed.error.issues[0];
    throw new ConfigError('CONFIG_INVALID', `invalid configuration: ${issue?.path.join('.') || '(root)'}: ${issue?.message}`);
  }
  return Object.freeze(parsed.data);
}

export function parseEngineConfig(input: Record<string, unknown>): EngineConfig {
  return parseWith(engineConfigSchema, input);
}

/** Engine settings from flags, falling back to LORA_GATEWAY_* environment variables. */
export function engineConfigFrom(flags: { backend?: string; 'max-lora-rank'?: string; 'lora-strategy'?: string }, env = process.env): EngineConfig {
  const num = (v: string | undefined) => (v === undefined ? undefined : Number(v));
  return parseEngineConfig({
    backend: flags.backend ?? env.LORA_GATEWAY_BACKEND,
    maxLoraRank: num(flags['max-lora-rank'] ?? env.LORA_GATEWAY_MAX_LORA_RANK),
    loraStrategy: flags['lora-strategy'] ?? env.LORA_GATEWAY_LORA_STRATEGY,
  });
}

const serveConfigSchema = z
  .object({
    host: z.string().default('127.0.0.1'),
    port: z.number().int().min(0).max(65535).default(8000),
    /** Model id clients send as `model` for the base model. @defaultValue the model folder's name */
    servedModelName: z.string().min(1).optional(),
    /** Every sub-folder is registered as an adapter at startup (id = folder name). */
    adapterDir: z.string().optional(),
    /** Where uploaded adapters (and the demo model) are stored. @defaultValue 'data' */
    dataDir: z.string().default('data'),
    /** Device page budget for KV cache + adapter weights. @defaultValue 256 MiB */
    deviceMemoryBytes: z.number().int().positive().default(256 * 1024 * 1024),
    /** Host-memory cache of adapters read from disk. @defaultValue 1 GiB */
    hostMemoryBytes: z.number().int().positive().default(1024 * 1024 * 1024),
    maxRunningSeqs: z.number().int().positive().default(64),
    /**
     * Prompt tokens prefilled per step; longer prompts are chunked. With the native kernels a
     * 2,048-token step of the 75M benchmark model takes ~0.5 s; on the wasm-only path ~4× that:
     * lower it there for steadier inter-token latency. @defaultValue 2048
     */
    maxBatchTokens: z.number().int().positive().default(2048),
    /**
     * Distinct adapters in one step. With the native LoRA kernel a row costs the same whatever
     * the other rows' adapters, so the default is no tighter than maxRunningSeqs. @defaultValue 64
     */
    maxAdaptersPerBatch: z.number().int().positive().default(64),
    /** Run the engine on its own worker thread, so HTTP never waits for a scheduler step. @defaultValue true */
    engineThread: z.boolean().default(true),
    /** Waiting requests beyond this get HTTP 429. @defaultValue 256 */
    maxWaiting: z.number().int().positive().default(256),
    /** Request bodies (uploads included) above this get HTTP 413. @defaultValue 256 MiB */
    bodyLimitBytes: z.number().int().positive().default(256 * 1024 * 1024),
    /** Time a connection has to send its request headers (a client that sends nothing is cut too). @defaultValue 10 s */
    headerTimeoutMs: z.number().int().min(0).default(10_000),
    /** Time to receive a whole request, body included; responses (long streams) are not limited. @defaultValue 300 s */
    requestTimeoutMs: z.number().int().min(0).default(300_000),
    /** An idle keep-alive connection is closed after this (above common load balancers' 60 s). @defaultValue 72 s */
    keepAliveTimeoutMs: z.number().int().min(0).default(72_000),
    /** On SIGTERM / SIGINT, running requests get this long to finish before they are cancelled. @defaultValue 30 s */
    shutdownGraceMs: z.number().int().min(0).default(30_000),
    /** Redis for federation (BullMQ); absent: federation routes answer 503 federation_disabled. */
    redisUrl: z.string().url().optional(),
    /** Prefix of federation's Redis keys and BullMQ queues. @defaultValue 'lora-gateway' */
    federationPrefix: z.string().regex(/^[A-Za-z0-9_.-]{1,64}$/).default('lora-gateway'),
    /** Keep every accepted client update for GET …/rounds/{n}/updates/{client}. @defaultValue true */
    federationKeepUpdates: z.boolean().default(true),
    /** The API keys file (SHA-256 hashes, tenant, role); absent: the server runs open. */
    apiKeysPath: z.string().min(1).optional(),
    /** Serve /metrics without a key even when keys are on. @defaultValue false */
    metricsPublic: z.boolean().default(false),
    /** Listen on a non-loopback address without keys (refused otherwise). @defaultValue false */
    allowUnauthenticated: z.boolean().default(false),
    /** Folders POST /v1/load_lora_adapter may read; absent: runtime loading from folders is off. */
    loraPathRoot: z.string().min(1).optional(),
    /** Least severe log entries written (one line per request at info). @defaultValue 'info' */
    logLevel: z.enum(LOG_LEVELS).default('info'),
    /**
     * Versions of each adapter kept on disk; older ones are removed once no request uses them.
     * Absent: every version is kept (federation's audit trail and rollbacks rely on old
     * versions, so dropping them is the operator's choice). @defaultValue keep all
     */
    keepVersions: z.number().int().positive().max(1_000_000).optional(),
  })
  .strict()
  // Node refuses a header timeout longer than the request timeout it is part of
  .refine((c) => c.requestTimeoutMs === 0 || c.headerTimeoutMs <= c.requestTimeoutMs, { message: 'header timeout must not exceed the request timeout', path: ['headerTimeoutMs'] });

export type ServeConfig = Readonly<z.infer<typeof serveConfigSchema>>;

export function parseServeConfig(input: Record<string, unknown>): ServeConfig {
  return parseWith(serveConfigSchema, input);
}

/** Parses sizes like 512MiB, 2GiB, 1e9 or plain bytes. */
export function parseBytes(v: string | undefined, name: string): number | undefined {
  if (v === undefined) return undefined;
  const m = /^(\d+(?:\.\d+)?(?:e\d+)?)\s*(b|kib|mib|gib|kb|mb|gb)?$/i.exec(v.trim());
  if (!m) throw new ConfigError('CONFIG_INVALID', `--${name} must be a size like 512MiB or 2GiB, got '${v}'`);
  const unit = (m[2] ?? 'b').toLowerCase();
  const mult: Record<string, number> = { b: 1, kib: 1024, mib: 1024 ** 2, gib: 1024 ** 3, kb: 1e3, mb: 1e6, gb: 1e9 };
  return Math.floor(Number(m[1]) * mult[unit]);
}

/** Parses durations like 10s, 500ms, 2m or plain milliseconds. */
export function parseDuration(v: string | undefined, name: string): number | undefined {
  if (v === undefined) return undefined;
  const m = /^(\d+(?:\.\d+)?)\s*(ms|s|m|h)?$/i.exec(v.trim());
  if (!m) throw new ConfigError('CONFIG_INVALID', `--${name} must be a duration like 10s, 500ms or 2m, got '${v}'`);
  const mult: Record<string, number> = { ms: 1, s: 1000, m: 60_000, h: 3_600_000 };
  return Math.round(Number(m[1]) * mult[(m[2] ?? 'ms').toLowerCase()]);
}
