import { AdapterError, LoraGatewayError } from '../errors.js';
import type { AdapterRecord } from '../pager/adapter-store.js';
import { prefillRowSpans } from './batch-generator.js';
import type { Sequence } from './sequence.js';

/**
 * Non-finite logits must never be sampled: argmax over NaN picks one token forever and every
 * logprob reads NaN (JSON null), a 200 with garbage. A row holding NaN or ±Inf ends its own
 * sequence with a named error instead; the other rows of the batch are unaffected (each row's
 * logits depend only on its own tokens and adapter).
 */

/** Index of the first NaN or ±Inf in a logits row, or -1. */
export function firstNonFinite(row: Float32Array): number {
  for (let i = 0; i < row.length; i++) if (!Number.isFinite(row[i])) return i;
  return -1;
}

/**
 * The error a sequence's logits earn: undefined when every value is finite; ADAPTER_OUTPUT_NOT_FINITE
 * when it runs an adapter (its version is then marked errored by the caller), MODEL_OUTPUT_NOT_FINITE
 * on the base model.
 */
export function outputError(record: AdapterRecord | null, rows: Float32Array, vocabSize: number): LoraGatewayError | undefined {
  const at = firstNonFinite(rows);
  if (at < 0) return undefined;
  const what = `${rows[at]} at token id ${at % vocabSize}`;
  if (!record) return new LoraGatewayError('MODEL_OUTPUT_NOT_FINITE', `the base model produced a non-finite logit (${what})`);
  return new AdapterError(
    'ADAPTER_OUTPUT_NOT_FINITE',
    `adapter '${record.id}' version ${record.version} produced a non-finite logit (${what}); the version is marked errored: upload a new version`,
  );
}

/** Checks a prefill's logits (in the order of `scoring`): per sequence, the error its rows earn, or undefined. */
export function prefillOutputErrors(scoring: Sequence[], rows: Float32Array, vocabSize: number): (LoraGatewayError | undefined)[] {
  return prefillRowSpans(
    scoring.map((s) => s.request),
    rows,
    vocabSize,
  ).map((span, i) => outputError(scoring[i].record, span, vocabSize));
}
