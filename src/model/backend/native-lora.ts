import * as tf from '@tensorflow/tfjs-core';
import type { KernelFunc, TensorInfo } from '@tensorflow/tfjs-core';
import type { BackendWasm } from '@tensorflow/tfjs-backend-wasm';
import { nativeBlas } from './native-matmul.js';

/** One adapter's factors for a projection: aT [in, r], bT [r, out], y += scale · x·aT·bT. */
export interface SgmvParticipant {
  aT: tf.Tensor2D;
  bT: tf.Tensor2D;
  rank: number;
  scale: number;
}

/** Rows [start, start + count) use participant `p`. */
export interface SgmvSegment {
  start: number;
  count: number;
  p: number;
}

const KERNEL = 'LoraGatewaySgmv';

function heap(backend: BackendWasm, t: TensorInfo): Float32Array {
  return backend.typedArrayFromHeap(t) as Float32Array;
}

let registered: boolean | undefined;

/**
 * Whether the native heterogeneous-LoRA kernel can run here: the addon loaded and the wasm
 * backend is active. Registers it for the wasm backend on first use.
 */
export function nativeSgmvAvailable(): boolean {
  if (tf.getBackend() !== 'wasm') return false;
  if (registered !== undefined) return registered;
  const blas = nativeBlas();
  registered = blas !== undefined;
  if (!blas) return false;
  const kernelFunc: KernelFunc = ({ inputs, attrs, backend }) => {
    const w = backend as BackendWasm;
    const { x, base, ...factors } = inputs as Record<string, TensorInfo>;
    const { segments, ranks, scales, outF } = attrs as unknown as { segments: number[]; ranks: number[]; scales: number[]; outF: number };
    const [T, inF] = x.shape;
    const out = w.makeOutput([T, outF], 'float32');
    // heap views only after the output exists: allocating may grow (and move) the heap
    const aT = ranks.map((_, p) => heap(w, factors[`a${p}`]));
    const bT = ranks.map((_, p) => heap(w, factors[`b${p}`]));
    const y = base ? heap(w, base) : null;
    blas.loraSgmv(heap(w, x), heap(w, out), T, inF, outF, Int32Array.from(segments), aT, bT, Int32Array.from(ranks), Float32Array.from(scales), y);
    return out;
  };
  tf.registerKernel({ kernelName: KERNEL, backendName: 'wasm', kernelFunc });
  return true;
}

/**
 * delta [T, out] for x [T, in]: each segment's rows times its participant's factors, zero on
 * rows in no segment, in one native call that reads every adapter's weights in place (no
 * stacked copy, exact FLOPs); with `base` [T, out], base + delta in the same call (no delta
 * tensor: in a 2,048-token prefill each one is 11 MB). No gradient: serving only (training runs
 * one adapter on all rows, which LoraBatch computes with ordinary ops).
 */
export function sgmvDelta(x: tf.Tensor2D, participants: SgmvParticipant[], segments: SgmvSegment[], outF: number, base?: tf.Tensor2D): tf.Tensor2D {
  const inputs: Record<string, tf.Tensor> = base ? { x, base } : { x };
  participants.forEach((p, i) => {
    inputs[`a${i}`] = p.aT;
    inputs[`b${i}`] = p.bT;
  });
  const attrs = {
    segments: segments.flatMap((s) => [s.start, s.count, s.p]),
    ranks: participants.map((p) => p.rank),
    scales: participants.map((p) => p.scale),
    outF,
  };
  return tf.engine().runKernel(KERNEL, inputs, attrs as unknown as tf.NamedAttrMap) as tf.Tensor2D;
}
