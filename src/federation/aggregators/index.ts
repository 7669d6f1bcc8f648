/**
 * The server's half of federated LoRA: one pure aggregator per method, their initial
 * states, and the global state as a served PEFT adapter.
 *
 *   method   clients upload   server keeps            aggregate                       exact
 *   fedavg   A_k, B_k         Ā, B̄                    Ā = Σ p_k A_k, B̄ = Σ p_k B_k    no (relativeError)
 *   ffa      B_k              A (frozen), B̄           B̄ = Σ p_k B_k                   yes
 *   flora    A_k, B_k (r_k)   stacked A, B (s = 1)     [A; p_k s_k A_k], [B, B_k]      yes (until compressed)
 *   fedsb    R_k              B, A (frozen), R̄        R̄ = Σ p_k R_k                   yes
 *
 * p_k = n_k / Σ n, each client's share of the round's training examples.
 */
export { exampleWeights, type ClientUpdate } from './client-update.js';
export { aggregateFedavg, type FedavgResult } from './fedavg.js';
export { aggregateFfa } from './ffa.js';
export { aggregateFlora, type FloraClientUpdate, type FloraResult } from './flora.js';
export { aggregateFedsb } from './fedsb.js';
export { fedsbGradientInit, fedsbRandomInit, loraSbStepSize, type FedsbGradientInitOptions, type ModuleShape } from './fedsb-init.js';
export { toServedAdapter, type ServedAdapterFiles, type ServedLora } from './served-adapter.js';
