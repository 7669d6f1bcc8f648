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
}

let resolved: ResolvedBackend | undefined;

async function tryNative(): Promise<ResolvedBackend | undefined> {
  // Native bindings are optional dependencies: their install step downloads libtensorflow,
  // which fails on machines without internet. A failed import is the normal case there.
  for (const pkg of ['@tensorflow/tfjs-node-gpu', '@tensorflow/tfjs-node']) {
    try {
      await import(pkg);
      if (await tf.setBackend('tensorflow')) {
        await tf.ready();
        return { name: 'tensorflow', source: pkg };
      }
    } catch {
      // not installed or its binary is missing: fall through to the next choice
    }
  }
  return undefined;
}

async function useBuiltin(name: 'wasm' | 'cpu'): Promise<ResolvedBackend> {
  const ok = await tf.setBackend(name);
  if (!ok) throw new ConfigError('BACKEND_UNAVAILABLE', `tfjs backend '${name}' failed to initialise`);
  await tf.ready();
  if (name === 'wasm') {
    installWasmKernels();
    return { name, source: '@tensorflow/tfjs-backend-wasm', matMul: installNativeMatMul().detail };
  }
  return { name, source: '@tensorflow/tfjs-backend-cpu' };
}

/**
 * Picks the tensor backend once per process: native TensorFlow (GPU, then CPU build) when it
 * loads, otherwise WebAssembly with SIMD. 'cpu' is the plain-JS reference backend, ~50× slower
 * than wasm; it exists for debugging, never for serving.
 */
export async function resolveBackend(choice: BackendChoice = "auto", log: (line: string) => void = () => {}): Promise<ResolvedBackend> {
  if (resolved) {
    if (choice !== 'auto' && choice !== resolved.name) {
      throw new ConfigError('BACKEND_UNAVAILABLE', `backend already resolved to '${resolved.name}', cannot switch to '${choice}'`);
    }
    return resolved;
  }
  let result: ResolvedBackend | undefined;
  if (choice === 'auto' || choice === 'tensorflow') {
    result = await tryNative();
    if (!result && choice === 'tensorflow') {
      throw new ConfigError('BACKEND_UNAVAILABLE', 'backend "tensorflow" requested but neither @tensorflow/tfjs-node-gpu nor @tensorflow/tfjs-node loads');
    }
  }
  result ??= await useBuiltin(choice === 'cpu' ? 'cpu' : 'wasm');
  resolved = result;
  log(`tensor backend: ${result.name} (${result.source})`);
  if (result.matMul) log(`matrix products: ${result.matMul}`);
  return result;
}
