import { FederationError } from '../../errors.js';
import type { JobPrivacy } from '../job-record.js';
import type { JobSpec } from '../job-spec.js';
import { dpSgdRound } from '../local-trainer.js';
import { addStep, epsilonOf, noiseMultiplierFor, type MechanismSteps } from './rdp-accountant.js';

/**
 * Client-level DP-FedAvg accounting: every published round is one step of the subsampled
 * Gaussian mechanism with noise multiplier σ and sampling rate q = clients_per_round / the
 * compatible clients registered (a fixed `clients` list samples everyone: q = 1).
 */
export function roundSampleRate(spec: JobSpec, compatibleClients: number): number {
  if (spec.clients) return 1;
  const m = spec.clients_per_round!;
  // nobody registered yet: plan as if every client took part (no amplification; the safe side)
  return compatibleClients <= m ? 1 : m / compatibleClients;
}

function fmt(x: number): string {
  return Number.isFinite(x) ? x.toPrecision(6) : String(x);
}

/**
 * The plan of a DP job at submission: σ (given, or the smallest that meets target_epsilon over
 * the planned rounds at today's q) and the ε of all its rounds. Refuses a plan that would
 * spend more than target_epsilon, naming the ε it would reach.
 */
export function planPrivacy(spec: JobSpec, compatibleClients: number): JobPrivacy {
  const dp = spec.dp!;
  if (dp.level === 'sample') {
    // each client's q is batch_size / its examples, known only once it trains: accounted per client
    return { level: 'sample', noise_multiplier: dp.noise_multiplier!, clip_norm: dp.clip_norm, delta: dp.delta, ...(dp.target_epsilon !== undefined ? { target_epsilon: dp.target_epsilon } : {}), history: [], epsilon: 0, clients: {} };
  }
  const q = roundSampleRate(spec, compatibleClients);
  const rounds = spec.rounds;
  const sigma = dp.noise_multiplier ?? noiseMultiplierFor(dp.target_epsilon!, dp.delta, q, rounds);
  const planned = epsilonOf([{ noiseMultiplier: sigma, sampleRate: q, steps: rounds }], dp.delta);
  if (dp.target_epsilon !== undefined && planned.epsilon > dp.target_epsilon) {
    throw new FederationError(
      'FED_DP_BUDGET_EXCEEDED',
      `job spec: dp: ${rounds} round(s) at noise_multiplier ${sigma} and sample rate ${fmt(q)} would spend ε = ${fmt(planned.epsilon)} (δ = ${dp.delta}), more than target_epsilon ${dp.target_epsilon}`,
    );
  }
  return {
    level: 'client',
    noise_multiplier: sigma,
    clip_norm: dp.clip_norm,
    delta: dp.delta,
    ...(dp.target_epsilon !== undefined ? { target_epsilon: dp.target_epsilon } : {}),
    planned_sample_rate: q,
    planned_epsilon: planned.epsilon,
    history: [],
    epsilon: 0,
  };
}

/** ε (and its order) after one more published round at rate q. */
export function epsilonAfterRound(privacy: JobPrivacy, q: number): { epsilon: number; order: number } {
  return epsilonOf(addStep(privacy.history, privacy.noise_multiplier, q), privacy.delta);
}

/** The accounting after one more published round at rate q (a new object: the caller keeps it once the round is published). */
export function accountRound(privacy: JobPrivacy, q: number): JobPrivacy {
  const history = addStep(privacy.history, privacy.noise_multiplier, q);
  const spent = epsilonOf(history, privacy.delta);
  return { ...privacy, history, epsilon: spent.epsilon, order: spent.order };
}

/** One client's DP-SGD in one round: steps at q = batch_size / n (the trainer's own count). */
export function clientRoundSteps(spec: JobSpec, examples: number): { sampleRate: number; steps: number } {
  return dpSgdRound({ steps: spec.local.steps, epochs: spec.local.epochs, batchSize: spec.local.batch_size }, examples);
}

/** Sample level: a client's ε after one more round of its DP-SGD, from its history in this job. */
export function clientEpsilonAfter(privacy: JobPrivacy, client: string, sampleRate: number, steps: number): { epsilon: number; order: number; history: MechanismSteps[] } {
  const history = addStep(privacy.clients?.[client]?.history ?? [], privacy.noise_multiplier, sampleRate, steps);
  return { ...epsilonOf(history, privacy.delta), history };
}

/** Sample level: the accounting after a round whose participants trained on these example counts. */
export function accountClients(privacy: JobPrivacy, spec: JobSpec, examples: Record<string, number>): JobPrivacy {
  const clients = { ...(privacy.clients ?? {}) };
  for (const [client, n] of Object.entries(examples)) {
    const { sampleRate, steps } = clientRoundSteps(spec, n);
    const { epsilon, order, history } = clientEpsilonAfter(privacy, client, sampleRate, steps);
    clients[client] = { history, epsilon, order, examples: n };
  }
  let worst: { epsilon: number; order?: number } = { epsilon: 0 };
  for (const c of Object.values(clients)) if (c.epsilon > worst.epsilon) worst = c;
  return { ...privacy, clients, epsilon: worst.epsilon, ...(worst.order !== undefined ? { order: worst.order } : {}) };
}
