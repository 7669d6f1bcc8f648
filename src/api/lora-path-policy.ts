import { readFile, realpath } from 'node:fs/promises';
import { isAbsolute, join, resolve, sep } from 'node:path';
import { AdapterError, RequestError } from '../errors.js';
import type { AdapterFiles } from '../pager/adapter-store.js';

const FILES = { config: 'adapter_config.json', weights: 'adapter_model.safetensors' } as const;

/**
 * Which server folders `POST /v1/load_lora_adapter` may read: none unless the server was
 * started with `--lora-path-root DIR` (as vLLM keeps runtime loading behind an explicit
 * switch), and then only folders under DIR. Symlinks are resolved before the check, for the
 * folder and for each file in it, so a link inside DIR cannot point out of it. Messages quote
 * the path as the client gave it and never the server's absolute folders.
 */
export class LoraPathPolicy {
  private constructor(private readonly root: string | undefined) {}

  /** `root` resolved once at startup (it must exist). */
  static async create(root: string | undefined): Promise<LoraPathPolicy> {
    if (root === undefined) return new LoraPathPolicy(undefined);
    return new LoraPathPolicy(await realpath(resolve(root)));
  }

  get enabled(): boolean {
    return this.root !== undefined;
  }

  /** Reads the adapter's two files from `given` (absolute, or relative to the root). */
  async read(given: string): Promise<AdapterFiles> {
    const root = this.root;
    if (root === undefined) {
      throw new RequestError('LORA_PATH_FORBIDDEN', 'loading adapters from server folders is off: start the server with --lora-path-root DIR, or upload with PUT /v1/adapters/{id}');
    }
    const outside = () => new RequestError('LORA_PATH_FORBIDDEN', `lora_path '${given}' is not inside the server's --lora-path-root`);
    if (given.includes('\0')) throw outside();
    const inRoot = (p: string) => p === root || p.startsWith(root + sep);
    const real = async (p: string, what: string): Promise<string> => {
      let r: string;
      try {
        r = await realpath(p);
      } catch (err) {
        const code = (err as NodeJS.ErrnoException).code;
        // a path outside the root says nothing about what exists there
        if (!inRoot(resolve(p))) throw outside();
        throw new AdapterError('ADAPTER_CONFIG_INVALID', `lora_path '${given}': cannot read ${what} (${code ?? 'error'})`, { cause: err });
      }
      if (!inRoot(r)) throw outside();
      return r;
    };
    const dir = await real(isAbsolute(given) ? given : join(root, given), 'the folder');
    const files: Partial<AdapterFiles> = {};
    for (const [key, name] of Object.entries(FILES) as [keyof AdapterFiles, string][]) {
      const path = await real(join(dir, name), name);
      try {
        files[key] = await readFile(path);
      } catch (err) {
        throw new AdapterError('ADAPTER_CONFIG_INVALID', `lora_path '${given}': cannot read ${name} (${(err as NodeJS.ErrnoException).code ?? 'error'})`, { cause: err });
      }
    }
    return files as AdapterFiles;
  }
}
