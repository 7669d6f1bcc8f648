/**
 * A slow, obvious float64 Llama + PEFT LoRA forward written straight from
 * transformers' modeling_llama.py and PEFT's lora/layer.py, independent of the engine's
 * code paths (no tfjs, no cache, no batching). Tests compare the engine against it.
 */

export interface ReferenceLora {
  /** module path ("model.layers.0.self_attn.q_proj") → A [r, in], B [out, r] row-major, scale */
  modules: Map<string, { a: Float64Array; b: Float64Array; rank: number; scale: number }>;
}

type Weights = Map<string, Float64Array>;

interface Cfg {
  hidden: number;
  inter: number;
  layers: number;
  heads: number;
  kvHeads: number;
  headDim: number;
  vocab: number;
  eps: number;
  theta: number;
  tied: boolean;
  qkvBias: boolean;
  oBias: boolean;
  window: number | undefined;
  rope: Record<string, number | string> | null;
}

function cfgOf(c: Record<string, unknown>): Cfg {
  const heads = c.num_attention_heads as number;
  const arch = (c.architectures as string[] | undefined)?.[0];
  const qwen = arch === 'Qwen2ForCausalLM';
  return {
    hidden: c.hidden_size as number,
    inter: c.intermediate_size as number,
    layers: c.num_hidden_layers as number,
    heads,
    kvHeads: (c.num_key_value_heads as number | undefined) ?? heads,
    headDim: (c.head_dim as number | undefined) ?? (c.hidden_size as number) / heads,
    vocab: c.vocab_size as number,
    eps: (c.rms_norm_eps as number | undefined) ?? 1e-6,
    theta: (c.rope_theta as number | undefined) ?? 10000,
    tied: (c.tie_word_embeddings as boolean | undefined) ?? false,
    qkvBias: qwen || ((c.attention_bias as boolean | undefined) ?? false),
    oBias: !qwen && ((c.attention_bias as boolean | undefined) ?? false),
    window: arch === 'MistralForCausalLM' ? ((c.sliding_window as number | undefined) ?? undefined) : undefined,
    rope: (c.rope_scaling as Record<string, number | string> | null | undefined) ?? null,
  };
}

function invFreq(cfg: Cfg): number[] {
  const d = cfg.headDim;
  const base: number[] = [];
  for (let i = 0; i < d; i += 2) base.push(1 / cfg.theta ** (i / d));
  const r = cfg.rope;
  const type = r ? (r.rope_type ?? r.type) : 'default';
  if (!r || type === 'default') return base;
  const factor = r.factor as number;
  if (type === 'linear') return base.map((f) => f / factor);
  // llama3, transcribed from _compute_llama3_parameters
  const low = r.low_freq_factor as number;
  const high = r.high_freq_factor as number;
  const old = r.original_max_position_embeddings as number;
  const lowWl = old / low;
  const highWl = old / high;
  return base.map((f) => {
    const wl = (2 * Math.PI) / f;
    let g = wl > lowWl ? f / factor : f;
    const smooth = (old / wl - low) / (high - low);
    const smoothed = ((1 - smooth) * g) / factor + smooth * g;
    const medium = !(wl < highWl) && !(wl > lowWl);
    if (medium) g = smoothed;
    return g;
  });
}

/** y = x Wᵀ (+ bias) + scale · (x Aᵀ) Bᵀ for one row x. */
function linear(x: Float64Array, w: Float64Array, out: number, bias?: Float64Array, lora?: { a: Float64Array; b: Float64Array; rank: number; scale: number }): Float64Array {
  const n = x.length;
  const y = new Float64Array(out);
  for (let o = 0; o < out; o++) {
    let s = bias ? bias[o] : 0;
    for (let i = 0; i < n; i++) s += x[i] * w[o * n + i];
    y[o] = s;
  }
  if (lora) {
    const xa = new Float64Array(lora.rank);
    for (let k = 0; k < lora.rank; k++) {
      let s = 0;
      for (let i = 0; i < n; i++) s += x[i] * lora.a[k * n + i];
      xa[k] = s;
    }
    for (let o = 0; o < out; o++) {
      let s = 0;
      for (let k = 0; k < lora.rank; k++) s += xa[k] * lora.b[o * lora.rank + k];
      y[o] += lora.scale * s;
    }
  }
  return y;
}

function rmsNorm(x: Float64Array, w: Float64Array, eps: number): Float64Array {
  let ms = 0;
  for (const v of x) ms += v * v;
  ms /= x.length;
  const r = 1 / Math.sqrt(ms + eps);
  return x.map((v, i) => w[i] * v * r);
}

/** rotate_half on one head: cat(-x[d/2:], x[:d/2]). */
function rope(x: Float64Array, offset: number, d: number, pos: number, freqs: number[]): void {
  const half = d / 2;
  const orig = x.slice(offset, offset + d);
  for (let j = 0; j < d; j++) {
    const angle = pos * freqs[j % half];
    const rot = j < half ? -orig[j + half] : orig[j - half];
    x[offset + j] = orig[j] * Math.cos(angle) + rot * Math.sin(angle);
  }
}

/** Full forward over `tokens` (no cache); returns logits per position. */
export function referenceForward(configJson: Record<string, unknown>, w: Weights, tokens: number[], lora?: ReferenceLora): Float64Array[] {
  const cfg = cfgOf(configJson);
  const freqs = invFreq(cfg);
  const { hidden: H, headDim: d, heads, kvHeads } = cfg;
  const g = heads / kvHeads;
  const get = (n: string) => {
    const t = w.get(n);
    if (!t) throw new Error(`reference: missing ${n}`);
    return t;
  };
  const mod = (path: string) => lora?.modules.get(path);
  const emb = get('model.embed_tokens.weight');
  let hs = tokens.map((t) => emb.slice(t * H, (t + 1) * H));
  for (let l = 0; l < cfg.layers; l++) {
    const p = `model.layers.${l}`;
    const xs = hs.map((h) => rmsNorm(h, get(`${p}.input_layernorm.weight`), cfg.eps));
    const proj = (name: string, x: Float64Array, out: number, bias: boolean) =>
      linear(x, get(`${p}.${name}.weight`), out, bias ? get(`${p}.${name}.bias`) : undefined, mod(`${p}.${name}`));
    const qs = xs.map((x) => proj('self_attn.q_proj', x, heads * d, cfg.qkvBias));
    const ks = xs.map((x) => proj('self_attn.k_proj', x, kvHeads * d, cfg.qkvBias));
    const vs = xs.map((x) => proj('self_attn.v_proj', x, kvHeads * d, cfg.qkvBias));
    qs.forEach((q, pos) => {
      for (let h = 0; h < heads; h++) rope(q, h * d, d, pos, freqs);
    });
    ks.forEach((k, pos) => {
      for (let h = 0; h < kvHeads; h++) rope(k, h * d, d, pos, freqs);
    });
    const attn = qs.map((q, i) => {
      const o = new Float64Array(heads * d);
      for (let h = 0; h < heads; h++) {
        const kvh = Math.floor(h / g);
        const scores: number[] = [];
        const keys: number[] = [];
        for (let j = 0; j <= i; j++) {
          if (cfg.window !== undefined && i - j >= cfg.window) continue;
          let s = 0;
          for (let e = 0; e < d; e++) s += q[h * d + e] * ks[j][kvh * d + e];
          scores.push(s / Math.sqrt(d));
          keys.push(j);
        }
        const m = Math.max(...scores);
        const ex = scores.map((s) => Math.exp(s - m));
        const z = ex.reduce((a, b) => a + b, 0);
        keys.forEach((j, idx) => {
          for (let e = 0; e < d; e++) o[h * d + e] += (ex[idx] / z) * vs[j][kvh * d + e];
        });
      }
      return o;
    });
    hs = hs.map((h, i) => {
      const ao = proj('self_attn.o_proj', attn[i], H, cfg.oBias);
      return h.map((v, k) => v + ao[k]);
    });
    hs = hs.map((h) => {
      const x = rmsNorm(h, get(`${p}.post_attention_layernorm.weight`), cfg.eps);
      const gate = proj('mlp.gate_proj', x, cfg.inter, false);
      const up = proj('mlp.up_proj', x, cfg.inter, false);
      const act = gate.map((v, k) => (v / (1 + Math.exp(-v))) * up[k]);
      const down = proj('mlp.down_proj', act, H, false);
      return h.map((v, k) => v + down[k]);
    });
  }
  const head = cfg.tied ? emb : get('lm_head.weight');
  return hs.map((h) => linear(rmsNorm(h, get('model.norm.weight'), cfg.eps), head, cfg.vocab));
}

export function logSoftmax(logits: ArrayLike<number>): Float64Array {
  let m = -Infinity;
  for (let i = 0; i < logits.length; i++) m = Math.max(m, logits[i]);
  let z = 0;
  for (let i = 0; i < logits.length; i++) z += Math.exp(logits[i] - m);
  const lz = m + Math.log(z);
  return Float64Array.from(logits, (v) => v - lz);
}
