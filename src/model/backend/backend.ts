import * as tf from '@tensorflow/tfjs-core';
// The union package registers the gradient functions (tfjs-core alone does not), which
// tf.grad needs when the federation module trains LoRA weights through this forward.
import '@tensorflow/tfjs';
import '@tensorflow/tfjs-backend-wasm';
import { ConfigError } from '../../errors.js';
import { installNativeMatMul } from './native-matmul.js';
import { installWasmKernels } from './wasm-kernels.js';

export type BackendChoice = 'auto' | 'tensorflow' | 'wasm' | 'cpu';

export interface ResolvedBackend {
  /** tfjs backend name actually running: 'tensorflow', 'wasm' or 'cpu'. */
  name: string;
  /** Where it came from, for the startup log line. */
  source: string;
  /** wasm only: whether matrix products run natively (OpenBLAS) or in wasm, and why. */
  matMul?: string;
  /** wasm only: the native OpenBLAS kernels (matrix products, SGMV LoRA, log Σ exp) are on. */
  nativeBlas?: boolean;
  /**
   * Why the native TensorFlow backend is not running (auto only: it was tried and failed to
   * load), each package's import error on its first line, for the startup log.
   */
  nativeUnavailable?: string;
}

/** How to get the native backend, for the startup line that says it did not load. */
export const NATIVE_BACKEND_HINT = 'to use it: npm install @tensorflow/tfjs-node (or @tensorflow/tfjs-node-gpu with CUDA) on a machine that can download libtensorflow';

let resolved: ResolvedBackend | undefined;

/** The native backend, or why each package failed to give it (one line per package). */
async function tryNative(): Promise<ResolvedBackend | { failures: string[] }> {
  // Native bindings are optional dependencies: their install step downloads libtensorflow,
  // which fails on machines without internet. A failed import is the normal case there.
  const failures: string[] = [];
  for (const pkg of ['@tensorflow/tfjs-node-gpu', '@tensorflow/tfjs-node']) {
    try {
      await import(pkg);
      if (await tf.setBackend('tensorflow')) {
        await tf.ready();
        return { name: 'tensorflow', source: pkg };
      }
      failures.push(`${pkg}: loaded, but the 'tensorflow' backend failed to initialise`);
    } catch (err) {
      // not installed or its binary is missing: fall through to the next choice
      failures.push(`${pkg}: ${firstLine(err)}`);
    }
  }
  return { failures };
}

function firstLine(err: unknown): string {
  const message = err instanceof Error ? err.message : String(err);
  return message.split('\n')[0].trim();
}

async function useBuiltin(name: 'wasm' | 'cpu'): Promise<ResolvedBackend> {
  const ok = await tf.setBackend(name);
  if (!ok) throw new ConfigError('BACKEND_UNAVAILABLE', `tfjs backend '${name}' failed to initialise`);
  await tf.ready();
  if (name === 'wasm') {
    installWasmKernels();
    const matMul = installNativeMatMul();
    return { name, source: '@tensorflow/tfjs-backend-wasm', matMul: matMul.detail, nativeBlas: matMul.native };
  }
  return { name, source: '@tensorflow/tfjs-backend-cpu' };
}

/**
 * Picks the tensor backend once per process: native TensorFlow (GPU, then CPU build) when it
 * loads, otherwise WebAssembly with SIMD. 'cpu' is the plain-JS reference backend, ~50× slower
 * than wasm; it exists for debugging, never for serving.
 */
export async function resolveBackend(choice: BackendChoice = 'auto', log: (line: string) => void = () => {}): Promise<ResolvedBackend> {
  if (resolved) {
    if (choice !== 'auto' && choice !== resolved.name) {
      throw new ConfigError('BACKEND_UNAVAILABLE', `backend already resolved to '${resolved.name}', cannot switch to '${choice}'`);
    }
    return resolved;
  }
  let result: ResolvedBackend | undefined;
  let nativeUnavailable: string | undefined;
  if (choice === 'auto' || choice === 'tensorflow') {
    const native = await tryNative();
    if ('failures' in native) {
      nativeUnavailable = native.failures.join('; ');
      if (choice === 'tensorflow') {
        throw new ConfigError('BACKEND_UNAVAILABLE', `backend "tensorflow" requested but neither @tensorflow/tfjs-node-gpu nor @tensorflow/tfjs-node loads (${nativeUnavailable}); ${NATIVE_BACKEND_HINT}`);
      }
    } else result = native;
  }
  result ??= { ...(await useBuiltin(choice === 'cpu' ? 'cpu' : 'wasm')), ...(nativeUnavailable ? { nativeUnavailable } : {}) };
  resolved = result;
  log(`tensor backend: ${result.name} (${result.source})`);
  if (result.nativeUnavailable) log(`native TensorFlow backend not loaded: ${result.nativeUnavailable}; ${NATIVE_BACKEND_HINT}`);
  if (result.matMul) log(`matrix products: ${result.matMul}`);
  return result;
}

/** The backend this thread resolved, undefined before resolveBackend ran (e.g. the API thread of a ThreadedGateway). */
export function resolvedBackend(): ResolvedBackend | undefined {
  return resolved;
}
