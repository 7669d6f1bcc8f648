import { z } from 'zod';
import { ConfigError } from './errors.js';

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

export function parseEngineConfig(input: Record<string, unknown>): EngineConfig {
  const clean = Object.fromEntries(Object.entries(input).filter(([, v]) => v !== undefined));
  const parsed = engineConfigSchema.safeParse(clean);
  if (!parsed.success) {
    const issue = parsed.error.issues[0];
    throw new ConfigError('CONFIG_INVALID', `invalid configuration: ${issue?.path.join('.') || '(root)'}: ${issue?.message}`);
  }
  return Object.freeze(parsed.data);
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
