import { z } from 'zod';
import { AdapterError } from '../../errors.js';
import { PROJECTIONS, projectionModulePath, type ProjectionName } from '../architecture/llama-weights.js';
import type { ModelConfig } from '../architecture/model-config.js';

/** One adapted projection: which module, its rank and its scaling s in y += s·(x Aᵀ) Bᵀ. */
export interface LoraModuleSpec {
  layer: number;
  proj: ProjectionName;
  /** `model.layers.{layer}.{self_attn|mlp}.{proj}`, the key PEFT matches patterns against. */
  modulePath: string;
  rank: number;
  scale: number;
}

const rawPeftConfig = z
  .object({
    peft_type: z.string().optional(),
    r: z.number().int().positive(),
    lora_alpha: z.number().positive(),
    target_modules: z.union([z.string(), z.array(z.string())]).nullish(),
    exclude_modules: z.union([z.string(), z.array(z.string())]).nullish(),
    layers_to_transform: z.union([z.number().int().nonnegative(), z.array(z.number().int().nonnegative())]).nullish(),
    layers_pattern: z.union([z.string(), z.array(z.string())]).nullish(),
    rank_pattern: z.record(z.number().int().positive()).nullish(),
    alpha_pattern: z.record(z.number().positive()).nullish(),
    use_rslora: z.boolean().optional(),
    use_dora: z.boolean().optional(),
    bias: z.string().optional(),
    fan_in_fan_out: z.boolean().optional(),
    modules_to_save: z.array(z.string()).nullish(),
    lora_bias: z.boolean().optional(),
  })
  .passthrough();

export type RawPeftConfig = z.infer<typeof rawPeftConfig>;

/** PEFT's `get_pattern_key`: the first pattern p (in insertion order) with re.match(`(.*\.)?(p)$`, key). */
function patternValue<T>(patterns: Record<string, T> | null | undefined, key: string): T | undefined {
  if (!patterns) return undefined;
  for (const [p, v] of Object.entries(patterns)) {
    if (new RegExp(`^(.*\\.)?(${p})$`).test(key)) return v;
  }
  return undefined;
}

function layerIndexOf(key: string, layersPattern: string[] | undefined): number | undefined {
  const patterns = layersPattern && layersPattern.length > 0 ? layersPattern : undefined;
  if (!patterns) {
    const m = /^.*\.[^.]*\.(\d+)\./.exec(key);
    return m ? Number(m[1]) : undefined;
  }
  for (const p of patterns) {
    const m = new RegExp(`^.*\\.${p}\\.(\\d+)\\.`).exec(key);
    if (m) return Number(m[1]);
  }
  return undefined;
}

function asList(v: string | string[] | null | undefined): string[] | undefined {
  if (v === null || v === undefined) return undefined;
  return Array.isArray(v) ? v : [v];
}

function fullMatch(pattern: string, key: string): boolean {
  return new RegExp(`^(?:${pattern})$`).test(key);
}

/** Module names a Llama model has that are not LoRA targets this engine serves. */
const NON_SERVABLE = new Set(['lm_head', 'embed_tokens', 'norm', 'input_layernorm', 'post_attention_layernorm', 'rotary_emb']);

/**
 * Resolves a PEFT `adapter_config.json` against the model: which projections of which
 * layers are adapted, with what rank and scaling, following PEFT's
 * `check_target_module_exists` and `get_pattern_key`. Options this engine cannot serve
 * exactly are refused rather than approximated.
 */
export function resolvePeftConfig(json: unknown, model: ModelConfig, maxRank: number, file = 'adapter_config.json'): LoraModuleSpec[] {
  const parsed = rawPeftConfig.safeParse(json);
  if (!parsed.success) {
    const issue = parsed.error.issues[0];
    throw new AdapterError('ADAPTER_CONFIG_INVALID', `${file}: ${issue?.path.join('.') || '(root)'}: ${issue?.message}`);
  }
  const c = parsed.data;
  checkPatterns(c, file);
  const refuse = (what: string) => {
    throw new AdapterError('ADAPTER_UNSUPPORTED', `${file}: ${what} is not supported`);
  };
  if (c.peft_type !== undefined && c.peft_type !== 'LORA') refuse(`peft_type '${c.peft_type}' (only LORA)`);
  if (c.use_dora) refuse('DoRA (use_dora: true)');
  if (c.bias !== undefined && c.bias !== 'none') refuse(`bias '${c.bias}' (only "none")`);
  if (c.fan_in_fan_out) refuse('fan_in_fan_out: true');
  if (c.lora_bias) refuse('lora_bias: true');
  if (c.modules_to_save && c.modules_to_save.length > 0) refuse(`modules_to_save (${c.modules_to_save.join(', ')})`);

  const targets = c.target_modules ?? undefined;
  if (targets === undefined) throw new AdapterError('ADAPTER_CONFIG_INVALID', `${file}: target_modules is missing`);
  const excludes = asList(c.exclude_modules);
  const layersToTransform = c.layers_to_transform ?? undefined;
  const layersPattern = asList(c.layers_pattern);
  const listTargets = typeof targets === 'string' ? (targets === 'all-linear' ? [...PROJECTIONS] : undefined) : targets;

  if (listTargets) {
    const unknown = listTargets.filter((t) => !PROJECTIONS.some((p) => t === p || t.endsWith(`.${p}`) || matchesAnyModule(t, model, p)));
    if (unknown.length > 0) {
      const why = unknown.some((u) => NON_SERVABLE.has(u.split('.').pop()!)) ? 'only the linear projections of the decoder layers can be adapted' : 'this model has no such module';
      throw new AdapterError(
        'ADAPTER_MODULE_UNKNOWN',
        `${file}: target_modules ${JSON.stringify(unknown)}: ${why} (adaptable: ${PROJECTIONS.join(', ')})`,
      );
    }
  }

  const specs: LoraModuleSpec[] = [];
  for (let layer = 0; layer < model.numLayers; layer++) {
    for (const proj of PROJECTIONS) {
      const key = projectionModulePath(layer, proj);
      if (excludes && excludes.some((e) => (typeof c.exclude_modules === 'string' ? fullMatch(e, key) : key === e || key.endsWith(`.${e}`)))) continue;
      let found: boolean;
      if (!listTargets) {
        found = fullMatch(targets as string, key);
      } else {
        found = listTargets.includes(key) || listTargets.some((t) => key.endsWith(`.${t}`));
        if (found && layersToTransform !== undefined && !(Array.isArray(layersToTransform) && layersToTransform.length === 0)) {
          const idx = layerIndexOf(key, layersPattern);
          found = idx !== undefined && (Array.isArray(layersToTransform) ? layersToTransform.includes(idx) : layersToTransform === idx);
        }
      }
      if (!found) continue;
      const rank = patternValue(c.rank_pattern, key) ?? c.r;
      const alpha = patternValue(c.alpha_pattern, key) ?? c.lora_alpha;
      if (rank > maxRank) {
        throw new AdapterError('ADAPTER_RANK_TOO_LARGE', `${file}: rank ${rank} of ${key} exceeds the configured maximum rank ${maxRank}`);
      }
      const scale = c.use_rslora ? alpha / Math.sqrt(rank) : alpha / rank;
      specs.push({ layer, proj, modulePath: key, rank, scale });
    }
  }
  if (specs.length === 0) {
    throw new AdapterError('ADAPTER_MODULE_UNKNOWN', `${file}: target_modules ${JSON.stringify(targets)} match no module of this model`);
  }
  return specs;
}

/**
 * Every regular expression the config holds compiles in the form it is matched in, else
 * ADAPTER_CONFIG_INVALID names it (PEFT's re.compile would raise too).
 */
function checkPatterns(c: RawPeftConfig, file: string): void {
  const forms: [string, string, string][] = [];
  // PEFT full-matches these as they are ('a)(' would compile inside a group, but not alone)
  if (typeof c.target_modules === 'string') forms.push(['target_modules', c.target_modules, c.target_modules]);
  if (typeof c.exclude_modules === 'string') forms.push(['exclude_modules', c.exclude_modules, c.exclude_modules]);
  for (const p of asList(c.layers_pattern) ?? []) forms.push(['layers_pattern', p, `^.*\\.${p}\\.(\\d+)\\.`]);
  for (const field of ['rank_pattern', 'alpha_pattern'] as const) {
    for (const p of Object.keys(c[field] ?? {})) forms.push([field, p, `^(.*\\.)?(${p})$`]);
  }
  for (const [field, p, form] of forms) {
    try {
      new RegExp(form);
    } catch (err) {
      throw new AdapterError('ADAPTER_CONFIG_INVALID', `${file}: ${field}: ${JSON.stringify(p)} is not a valid regular expression`, { cause: err });
    }
  }
}

/** A list target like "self_attn.q_proj" or "layers.0.mlp.up_proj" names a suffix of some module path. */
function matchesAnyModule(target: string, model: ModelConfig, proj: ProjectionName): boolean {
  for (let l = 0; l < model.numLayers; l++) {
    const key = projectionModulePath(l, proj);
    if (key === target || key.endsWith(`.${target}`)) return true;
  }
  return false;
}
