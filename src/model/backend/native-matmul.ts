import * as tf from '@tensorflow/tfjs-core';
import { broadcast_util, util, type KernelFunc, type TensorInfo } from '@tensorflow/tfjs-core';
import type { BackendWasm } from '@tensorflow/tfjs-backend-wasm';
import { existsSync, readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { fileURLToPath } from 'node:url';
import { isMainThread } from 'node:worker_threads';

/**
 * Matrix products at native speed on every core, behind tfjs's own extension point: a
 * BatchMatMul kernel for the wasm backend that hands the operands, as views into the wasm heap
 * (no copy), to OpenBLAS's multithreaded sgemm through a small Node-API addon
 * (native/blas, built at install when the library and a compiler are there). Everything else
 * in the engine is unchanged; without the addon the stock XNNPACK kernel runs, and startup
 * says which.
 *
 *   out[i] = op(a[i·sa]) · op(b[i·sb]),  sa / sb = 0 when that side has batch 1 (broadcast)
 */
interface NativeBlas {
  sgemmBatch(a: Float32Array, b: Float32Array, c: Float32Array, batch: number, m: number, n: number, k: number, transA: boolean, transB: boolean, strideA: number, strideB: number): void;
  describe(): { config: string; core: string; threads: number };
  setThreads(n: number): void;
  logSumExp(x: Float32Array): number;
  loraSgmv(x: Float32Array, out: Float32Array, T: number, inF: number, outF: number, segments: Int32Array, aT: Float32Array[], bT: Float32Array[], ranks: Int32Array, scales: Float32Array, base?: Float32Array | null): void;
}

export interface MatMulPath {
  native: boolean;
  /** For the startup line: which library, core type and threads, or why not. */
  detail: string;
}

const ADDON = fileURLToPath(new URL('../../../native/blas/build/Release/lora_gateway_blas.node', import.meta.url));

/** Below this many multiply-adds the N-API call and OpenBLAS's threading cost more than wasm's kernel saves. */
const MIN_NATIVE_MACS = 4096;

/**
 * The OpenBLAS kernel family for this CPU, from its feature flags, when the user has not set
 * OPENBLAS_CORETYPE. Debian's OpenBLAS 0.3.21 picks its kernels by CPU model, and on CPU models
 * newer than it knows it falls back to Prescott (SSE3): on this project's Intel Xeon machines
 * that ran 1024³ at 170 GFLOP/s against 270–280 with SkylakeX's AVX-512 kernels
 * (bench:matmul-paths), and on AMD EPYC (Zen 4) it detects Cooperlake itself, which SkylakeX
 * matches for sgemm. Must run before the addon loads: OpenBLAS reads the variable once, in its
 * library constructor.
 */
export function chooseOpenBlasCore(cpuinfo: string | undefined, env: NodeJS.ProcessEnv): string | undefined {
  if (env.OPENBLAS_CORETYPE !== undefined || cpuinfo === undefined) return undefined;
  const line = cpuinfo.split('\n').find((l) => l.startsWith('flags'));
  if (!line) return undefined;
  const flags = new Set(line.slice(line.indexOf(':') + 1).trim().split(/\s+/));
  if (['avx512f', 'avx512bw', 'avx512dq', 'avx512vl'].every((f) => flags.has(f))) return 'SkylakeX';
  if (flags.has('avx2') && flags.has('fma')) return 'Haswell';
  return undefined;
}

function readCpuinfo(): string | undefined {
  try {
    return readFileSync('/proc/cpuinfo', 'utf8');
  } catch {
    return undefined;
  }
}

/**
 * Sets OPENBLAS_CORETYPE from the CPU's flags when the user has not (see chooseOpenBlasCore).
 * Call on the main thread before starting a thread that loads the addon: a worker's
 * process.env is its own copy, so only the main thread's assignment reaches the C environment
 * that OpenBLAS reads; the worker inherits both variables.
 */
export function prepareOpenBlasEnvironment(): void {
  const core = chooseOpenBlasCore(readCpuinfo(), process.env);
  if (!core) return;
  process.env.OPENBLAS_CORETYPE = core;
  process.env.LORA_GATEWAY_BLAS_CORE_FROM_FLAGS = core;
}

function loadAddon(): { blas?: NativeBlas; why?: string } {
  const setting = (process.env.LORA_GATEWAY_NATIVE_BLAS ?? 'auto').toLowerCase();
  if (setting === 'off' || setting === '0' || setting === 'false') return { why: 'turned off by LORA_GATEWAY_NATIVE_BLAS' };
  if (!existsSync(ADDON)) return { why: 'native/blas addon not built (install libopenblas-dev, then npm run build:native)' };
  if (isMainThread) prepareOpenBlasEnvironment();
  try {
    return { blas: createRequire(import.meta.url)(ADDON) as NativeBlas };
  } catch (err) {
    return { why: `native/blas addon does not load: ${(err as Error).message.split('\n')[0]}` };
  }
}

function heap(backend: BackendWasm, t: TensorInfo): Float32Array {
  return backend.typedArrayFromHeap(t) as Float32Array;
}

function batchMatMulKernel(blas: NativeBlas, stock: KernelFunc): KernelFunc {
  return (args) => {
    const { a, b } = args.inputs as { a: TensorInfo; b: TensorInfo };
    const { transposeA, transposeB } = args.attrs as unknown as { transposeA: boolean; transposeB: boolean };
    const backend = args.backend as BackendWasm;
    if (a.dtype !== 'float32' || b.dtype !== 'float32') return stock(args);
    const ra = a.shape.length;
    const rb = b.shape.length;
    const k = transposeA ? a.shape[ra - 2] : a.shape[ra - 1];
    const kB = transposeB ? b.shape[rb - 1] : b.shape[rb - 2];
    const m = transposeA ? a.shape[ra - 1] : a.shape[ra - 2];
    const n = transposeB ? b.shape[rb - 2] : b.shape[rb - 1];
    const batchA = util.sizeFromShape(a.shape.slice(0, -2));
    const batchB = util.sizeFromShape(b.shape.slice(0, -2));
    const outer = broadcast_util.assertAndGetBroadcastShape(a.shape.slice(0, -2), b.shape.slice(0, -2));
    const batch = util.sizeFromShape(outer);
    // only plain batches (equal, or one side a single matrix) map to strided sgemm calls
    const plain = batchA === batchB || batchA === 1 || batchB === 1;
    // Every row count goes native, decode at batch 1 included: with the AVX-512 kernels OpenBLAS
    // beats XNNPACK there too (m75 shape, decode step at batch 1: 25 vs 26 ms, batch 4: 32 vs
    // 38 ms), and XNNPACK would keep a packed copy of every weight it multiplies, doubling the
    // model's memory (the stock kernel caches one per weight tensor).
    if (k !== kB || !plain || m * n * k < MIN_NATIVE_MACS || n === 0 || k === 0) return stock(args);
    const out = backend.makeOutput([...outer, m, n], 'float32');
    // views are taken after the output exists: allocating may grow (and move) the heap
    blas.sgemmBatch(heap(backend, a), heap(backend, b), heap(backend, out), batch, m, n, k, transposeA, transposeB, batchA === 1 ? 0 : m * k, batchB === 1 ? 0 : k * n);
    return out;
  };
}

let path: MatMulPath | undefined;
let loaded: NativeBlas | undefined;

/**
 * Registers the native BatchMatMul for the wasm backend when the addon loads (idempotent);
 * returns which path matrix products take.
 */
export function installNativeMatMul(): MatMulPath {
  if (path) return path;
  const { blas, why } = loadAddon();
  const stock = tf.getKernel('BatchMatMul', 'wasm');
  if (!blas || !stock) {
    path = { native: false, detail: `wasm XNNPACK, one thread (${why ?? 'no wasm BatchMatMul kernel'})` };
    return path;
  }
  const threads = Number(process.env.LORA_GATEWAY_BLAS_THREADS);
  if (Number.isInteger(threads) && threads > 0) blas.setThreads(threads);
  loaded = blas;
  tf.unregisterKernel('BatchMatMul', 'wasm');
  tf.registerKernel({ ...stock, kernelFunc: batchMatMulKernel(blas, stock.kernelFunc) });
  const d = blas.describe();
  const chosen = process.env.LORA_GATEWAY_BLAS_CORE_FROM_FLAGS;
  path = { native: true, detail: `OpenBLAS sgemm, ${d.threads} thread(s), ${d.core} kernels (${d.config.split(' ').slice(0, 2).join(' ')}${chosen ? `; OPENBLAS_CORETYPE=${chosen} from the CPU's flags` : ''})` };
  return path;
}

/** Which path matrix products take (undefined before the wasm backend is resolved). */
export function matMulPath(): MatMulPath | undefined {
  return path;
}

/** The loaded addon, for other native kernels (undefined on the wasm-only path). */
export function nativeBlas(): NativeBlas | undefined {
  return loaded;
}
