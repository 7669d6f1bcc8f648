import * as tf from '@tensorflow/tfjs-core';
import { slice_util, util, type KernelFunc, type TensorInfo } from '@tensorflow/tfjs-core';
import type { BackendWasm } from '@tensorflow/tfjs-backend-wasm';

/**
 * Replacements for two tfjs-backend-wasm 4.22 kernels the forward pass leans on.
 *
 * - Slice: the stock kernel calls `backend.readSync(x)`, which copies the WHOLE input out of
 *   the wasm heap for every slice. Cutting one sequence's rows out of a [T, hidden] batch thus
 *   cost O(T·hidden) each: 32 slices of 16 rows from 512×576 took 14.8 ms here.
 * - GatherV2: the stock kernel copies element by element (17 ms for 512 rows of 576 floats).
 *
 * Both replacements copy contiguous runs straight between heap views. Views are taken after
 * the output is allocated, because allocation may grow (and so move) the heap.
 */

function heapView(backend: BackendWasm, t: TensorInfo): tf.TypedArray {
  return backend.typedArrayFromHeap(t) as tf.TypedArray;
}

function sliceKernel(fallback: KernelFunc): KernelFunc {
  return (args) => {
    const x = args.inputs.x as TensorInfo;
    const backend = args.backend as BackendWasm;
    if (x.dtype === 'string') return fallback(args);
    const { begin, size } = args.attrs as unknown as { begin: number[]; size: number[] };
    const [b, s] = slice_util.parseSliceParams(x as tf.TensorInfo as tf.Tensor, begin, size);
    const out = backend.makeOutput(s, x.dtype);
    const total = util.sizeFromShape(s);
    if (total === 0) return out;
    const xv = heapView(backend, x);
    const ov = heapView(backend, out);
    const rank = x.shape.length;
    const strides = util.computeStrides(x.shape);
    if (rank === 0 || slice_util.isSliceContinous(x.shape, b, s)) {
      const offset = rank === 0 ? 0 : slice_util.computeFlatOffset(b, strides);
      ov.set(xv.subarray(offset, offset + total));
      return out;
    }
    // odometer over every axis but the last; each step copies one contiguous innermost run
    const inner = s[rank - 1];
    const idx = new Array(rank - 1).fill(0);
    for (let o = 0; o < total; o += inner) {
      let offset = b[rank - 1];
      for (let d = 0; d < rank - 1; d++) offset += (b[d] + idx[d]) * strides[d];
      ov.set(xv.subarray(offset, offset + inner), o);
      for (let d = rank - 2; d >= 0; d--) {
        if (++idx[d] < s[d]) break;
        idx[d] = 0;
      }
    }
    return out;
  };
}

function gatherKernel(fallback: KernelFunc): KernelFunc {
  return (args) => {
    const { x, indices } = args.inputs as { x: TensorInfo; indices: TensorInfo };
    const { axis, batchDims } = args.attrs as unknown as { axis: number; batchDims: number };
    const backend = args.backend as BackendWasm;
    if (batchDims !== 0 || x.dtype === 'string') return fallback(args);
    const ax = util.parseAxisParam(axis, x.shape)[0];
    const idx = Int32Array.from(heapView(backend, indices));
    const dim = x.shape[ax];
    for (const i of idx) {
      if (!(i >= 0 && i < dim)) throw new Error(`GatherV2: the index value ${i} is not in [0, ${dim - 1}]`);
    }
    const outer = util.sizeFromShape(x.shape.slice(0, ax));
    const slice = util.sizeFromShape(x.shape.slice(ax + 1));
    const out = backend.makeOutput([...x.shape.slice(0, ax), ...indices.shape, ...x.shape.slice(ax + 1)], x.dtype);
    const xv = heapView(backend, x);
    const ov = heapView(backend, out);
    const n = idx.length;
    for (let o = 0; o < outer; o++) {
      for (let i = 0; i < n; i++) {
        const from = (o * dim + idx[i]) * slice;
        ov.set(xv.subarray(from, from + slice), (o * n + i) * slice);
      }
    }
    return out;
  };
}

let installed = false;

/** Swaps in the faster Slice and GatherV2 kernels for the wasm backend (idempotent). */
export function installWasmKernels(): void {
  if (installed) return;
  installed = true;
  for (const [name, make] of [
    ['Slice', sliceKernel],
    ['GatherV2', gatherKernel],
  ] as const) {
    const stock = tf.getKernel(name, 'wasm');
    if (!stock) continue;
    tf.unregisterKernel(name, 'wasm');
    tf.registerKernel({ ...stock, kernelFunc: make(stock.kernelFunc) });
  }
}
