import type { JobRecord, RoundRecord } from '../job-record.js';
import { clientEpsilonAfter, clientRoundSteps, epsilonAfterRound, roundSampleRate } from './privacy-plan.js';

/**
 * A DP job's budget check as a round starts, before anything of it is trained or released.
 *
 * Sample level: clients whose next round of DP-SGD would take their ε past target_epsilon are
 * dropped from the round (a client not seen yet checks itself, knowing its n); with nobody left
 * the job stops. Client level: the round's subsampled Gaussian step at q = sampled / compatible
 * clients must keep the job's ε within the target, else the job stops; otherwise the round
 * records q and its fixed DP-FedAvg denominator (the clients sampled).
 *
 * Mutates `round` (dropped clients, sampleRate, dpDenominator); returns why the job must stop.
 */
export function applyRoundBudget(rec: JobRecord, round: RoundRecord, compatibleClients: number): { code: string; message: string } | undefined {
  const privacy = rec.privacy;
  if (!privacy || round.kind !== 'train') return undefined;
  if (privacy.level === 'sample') {
    const target = privacy.target_epsilon;
    if (target === undefined) return undefined;
    for (const c of round.clients) {
      const known = privacy.clients?.[c.client];
      if (c.status === 'dropped' || !known) continue;
      const { sampleRate, steps } = clientRoundSteps(rec.spec, known.examples);
      const after = clientEpsilonAfter(privacy, c.client, sampleRate, steps);
      if (after.epsilon > target) Object.assign(c, { status: 'dropped', reason: `privacy_budget_exhausted: ε would reach ${after.epsilon.toPrecision(6)} > ${target}` });
    }
    if (round.clients.every((c) => c.status === 'dropped')) {
      return { code: 'privacy_budget_exhausted', message: `round ${round.round}: every selected client's next round of DP-SGD would pass target_epsilon ${target} (δ = ${privacy.delta})` };
    }
    return undefined;
  }
  const q = roundSampleRate(rec.spec, compatibleClients);
  const target = privacy.target_epsilon;
  const after = epsilonAfterRound(privacy, q);
  if (target !== undefined && after.epsilon > target) {
    return {
      code: 'privacy_budget_exhausted',
      message: `round ${round.round} at sample rate ${q.toPrecision(6)} would bring ε from ${privacy.epsilon.toPrecision(6)} to ${after.epsilon.toPrecision(6)}, past target_epsilon ${target} (δ = ${privacy.delta})`,
    };
  }
  round.sampleRate = q;
  round.dpDenominator = rec.spec.clients ? rec.spec.clients.length : Math.max(1, round.clients.filter((c) => c.status !== 'dropped').length);
  return undefined;
}
