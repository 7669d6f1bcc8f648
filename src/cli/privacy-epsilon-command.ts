import { parseArgs } from 'node:util';
import { LoraGatewayError } from '../errors.js';
import { epsilonOf, noiseMultiplierFor } from '../federation/privacy/rdp-accountant.js';

export const PRIVACY_EPSILON_USAGE = `lora-gateway privacy-epsilon — ε of the subsampled Gaussian mechanism (RDP accountant, as Opacus)

Usage:
  lora-gateway privacy-epsilon --sample-rate Q --noise-multiplier S --steps N --delta D [--json]
  lora-gateway privacy-epsilon --sample-rate Q --target-epsilon E --steps N --delta D [--json]

  --sample-rate Q        probability that one record (DP-SGD) or client (DP-FedAvg) is in a step, 0 < Q ≤ 1
  --noise-multiplier S   noise std / clipping norm
  --target-epsilon E     instead of S: print the smallest S (Opacus's search, ε within 0.01) that meets E
  --steps N              steps (DP-SGD batches, or DP-FedAvg rounds)
  --delta D              target δ, 0 < D < 1
  --json                 one line: {"epsilon", "order"} (plus "noise_multiplier" with --target-epsilon)
`;

function positive(v: string | undefined, name: string, { integer = false, max = Infinity } = {}): number {
  if (v === undefined) throw new LoraGatewayError('REQUEST_INVALID', `privacy-epsilon needs --${name}`);
  const n = Number(v);
  if (!Number.isFinite(n) || n <= 0 || n > max || (integer && !Number.isSafeInteger(n))) {
    throw new LoraGatewayError('REQUEST_INVALID', `--${name} must be ${integer ? 'a positive integer' : `a number in (0, ${max === Infinity ? '∞' : max}]`}, got '${v}'`);
  }
  return n;
}

/** Runs the command; returns the exit status (2 for usage errors, as the other commands). */
export function privacyEpsilon(argv: string[], out: (s: string) => void, err: (s: string) => void): number {
  let flags;
  try {
    ({ values: flags } = parseArgs({
      args: argv,
      options: {
        'sample-rate': { type: 'string' },
        'noise-multiplier': { type: 'string' },
        'target-epsilon': { type: 'string' },
        steps: { type: 'string' },
        delta: { type: 'string' },
        json: { type: 'boolean' },
        help: { type: 'boolean', short: 'h' },
      },
      strict: true,
    }));
  } catch (e) {
    err(`${(e as Error).message}\n\n${PRIVACY_EPSILON_USAGE}`);
    return 2;
  }
  if (flags.help) {
    out(PRIVACY_EPSILON_USAGE);
    return 0;
  }
  try {
    if ((flags['noise-multiplier'] === undefined) === (flags['target-epsilon'] === undefined)) {
      throw new LoraGatewayError('REQUEST_INVALID', 'give exactly one of --noise-multiplier or --target-epsilon');
    }
    const q = positive(flags['sample-rate'], 'sample-rate', { max: 1 });
    const steps = positive(flags.steps, 'steps', { integer: true });
    const delta = positive(flags.delta, 'delta', { max: 1 });
    if (delta >= 1) throw new LoraGatewayError('REQUEST_INVALID', `--delta must be below 1, got '${flags.delta}'`);
    const target = flags['target-epsilon'] === undefined ? undefined : positive(flags['target-epsilon'], 'target-epsilon');
    const sigma = target === undefined ? positive(flags['noise-multiplier'], 'noise-multiplier') : noiseMultiplierFor(target, delta, q, steps);
    const { epsilon, order } = epsilonOf([{ noiseMultiplier: sigma, sampleRate: q, steps }], delta);
    if (flags.json) {
      out(`${JSON.stringify({ epsilon, order, ...(target === undefined ? {} : { noise_multiplier: sigma }) })}\n`);
    } else {
      const head = target === undefined ? '' : `noise multiplier ${sigma} meets ε ≤ ${target}: `;
      out(`${head}ε = ${epsilon} at RDP order ${order} (q = ${q}, σ = ${sigma}, ${steps} steps, δ = ${delta})\n`);
    }
    return 0;
  } catch (e) {
    if (e instanceof LoraGatewayError) {
      err(`error ${e.code}: ${e.message}\n`);
      return 2;
    }
    throw e;
  }
}
