/**
 * bench:serve's record types and report: one row per (adapters × α × system) cell, in the
 * columns BENCHMARKS.md shows.
 */

export interface TraceRequest {
  /** Seconds after the start of the cell. */
  arrivalS: number;
  adapter: number;
  promptIds: number[];
  outputLen: number;
}

export interface Outcome {
  ok: boolean;
  /** Seconds from the scheduled arrival. */
  e2eS: number;
  ttftS?: number;
  completionTokens: number;
  error?: string;
}

export type SystemName = 'gateway' | 'baseline';

export interface CellResult {
  adapters: number;
  alpha: number;
  system: SystemName;
  label: string;
  outcomes: Outcome[];
  trace: TraceRequest[];
  durationS: number;
  meanBatch: number;
  steps: StepTimes;
  devicePeakMiB: number;
  rssPeakMiB: number;
  wasmHeapMiB: number;
  deviceLoads: number;
  diskReads: number;
}

/**
 * Wall time between consecutive scheduler steps while the batcher had work, split into steps
 * that admitted requests (prefill of the new prompts + repacking the decode batch + one decode)
 * and decode-only steps. HTTP and SSE handling between steps is included in both.
 */
export interface StepTimes {
  decodeSteps: number;
  decodeMs: number;
  decodeRows: number;
  prefillSteps: number;
  prefillMs: number;
  /** Sum of the pager's device-load times (host or disk read + upload), seconds. */
  adapterLoadS: number;
}

// ---------------------------------------------------------------------------------------------
// Report

/** numpy.percentile's default (linear interpolation between closest ranks). */
export function quantile(xs: number[], q: number): number {
  if (xs.length === 0) return NaN;
  const s = [...xs].sort((a, b) => a - b);
  const pos = (s.length - 1) * q;
  const lo = Math.floor(pos);
  return s[lo] + (s[Math.min(lo + 1, s.length - 1)] - s[lo]) * (pos - lo);
}

export interface Summary {
  reqPerS: number;
  tokPerS: number;
  failures: number;
  e2e: [number, number, number];
  ttft: [number, number];
  /** S-LoRA's attainment: the share of requests whose first token came within the TTFT SLO. */
  slo: number;
  /** The share that ended within sloFactor × their output tokens × the lone per-token latency. */
  sloE2e: number;
}

export function summarize(c: CellResult, perTokenS: number, sloFactor: number, sloTtftS: number): Summary {
  const ok = c.outcomes.filter((o) => o.ok);
  const e2e = ok.map((o) => o.e2eS);
  const ttft = ok.flatMap((o) => (o.ttftS === undefined ? [] : [o.ttftS]));
  const met = c.outcomes.filter((o, i) => o.ok && o.e2eS <= sloFactor * c.trace[i].outputLen * perTokenS).length;
  // S-LoRA's attainment_func: first-token latency under the bound; failed requests count as missed
  const ttftMet = c.outcomes.filter((o) => o.ok && o.ttftS !== undefined && o.ttftS < sloTtftS).length;
  return {
    reqPerS: ok.length / c.durationS,
    tokPerS: ok.reduce((s, o) => s + o.completionTokens, 0) / c.durationS,
    failures: c.outcomes.length - ok.length,
    e2e: [quantile(e2e, 0.5), quantile(e2e, 0.9), quantile(e2e, 0.99)],
    ttft: [quantile(ttft, 0.5), quantile(ttft, 0.9)],
    slo: ttftMet / c.outcomes.length,
    sloE2e: met / c.outcomes.length,
  };
}

export const f2 = (x: number) => x.toFixed(2);

export function printRow(c: CellResult, s: Summary, maxAdaptersPerBatch: number): void {
  const system = `${c.system === 'gateway' ? `gateway (≤${maxAdaptersPerBatch}/batch)` : 'baseline (1/batch)'}${c.label}`;
  const distinct = new Set(c.trace.map((r) => r.adapter)).size;
  console.log(
    `| ${c.adapters} | ${c.alpha} | ${distinct} | ${system} | ${f2(s.reqPerS)} | ${s.tokPerS.toFixed(1)} | ${s.e2e.map(f2).join(' / ')} | ${s.ttft.map(f2).join(' / ')} | ` +
      `${(100 * s.slo).toFixed(0)}% | ${(100 * s.sloE2e).toFixed(0)}% | ${c.meanBatch.toFixed(1)} | ${c.deviceLoads} / ${c.diskReads} | ${c.devicePeakMiB.toFixed(0)} | ${c.rssPeakMiB.toFixed(0)} | ${c.durationS.toFixed(1)}${s.failures ? ` | ${s.failures} failed` : ''} |`,
  );
  for (const o of c.outcomes.filter((x) => !x.ok).slice(0, 3)) console.log(`    failure: ${o.error}`);
}

export function printStepRow(c: CellResult): void {
  const t = c.steps;
  const busyMs = t.decodeMs + t.prefillMs;
  const ok = c.outcomes.map((o, i) => (o.ok ? c.trace[i].promptIds.length + o.completionTokens : 0));
  const allTokPerS = ok.reduce((a, b) => a + b, 0) / c.durationS;
  const decodeMs = t.decodeSteps > 0 ? t.decodeMs / t.decodeSteps : NaN;
  const decodeRows = t.decodeSteps > 0 ? t.decodeRows / t.decodeSteps : NaN;
  console.log(
    `| ${c.adapters} | ${c.alpha} | ${c.system}${c.label} | ${t.decodeSteps} | ${decodeMs.toFixed(0)} | ${decodeRows.toFixed(1)} | ${((1000 * decodeRows) / decodeMs).toFixed(1)} | ` +
      `${t.prefillSteps} | ${t.prefillSteps > 0 ? (t.prefillMs / t.prefillSteps).toFixed(0) : '–'} | ${busyMs > 0 ? ((100 * t.prefillMs) / busyMs).toFixed(0) : '–'}% | ` +
      `${allTokPerS.toFixed(1)} | ${t.adapterLoadS.toFixed(1)} | ${c.wasmHeapMiB.toFixed(0)} |`,
  );
}

export function verdict(ratio: number, target: number): string {
  return `${f2(ratio)}× (target ≥ ${target}×: ${ratio >= target ? 'met' : 'NOT met'})`;
}
