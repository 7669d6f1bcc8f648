import { spawn, type ChildProcess } from 'node:child_process';

/** One JSON log line of `serve` (stdout is a pipe here, so every line is JSON). */
export type LogEntry = Record<string, unknown> & { level: number; msg: string };

export interface ServeProcess {
  child: ChildProcess;
  /** The base URL it listens on, from its "serving … at URL" line. */
  url: string;
  /** Every JSON line it has written to stdout so far. */
  entries: LogEntry[];
  /** Startup lines (the `msg` of JSON entries) and stderr, as text. */
  text(): string;
  /** Resolves once an entry matching `pick` has been written. */
  waitFor(pick: (e: LogEntry) => boolean, timeoutMs?: number): Promise<LogEntry>;
  stop(): Promise<void>;
}

/** Spawns `lora-gateway serve ARGS` (from source) and resolves once it listens. */
export async function startServe(args: string[], env: NodeJS.ProcessEnv = process.env): Promise<ServeProcess> {
  const child = spawn(process.execPath, ['--import', 'tsx', 'src/cli/main.ts', 'serve', ...args], { stdio: ['ignore', 'pipe', 'pipe'], env });
  const entries: LogEntry[] = [];
  let stderr = '';
  let partial = '';
  const waiters: (() => void)[] = [];
  child.stdout!.on('data', (d: Buffer) => {
    const lines = (partial + d.toString()).split('\n');
    partial = lines.pop()!;
    // a line that is not JSON fails the parse here, and so the test: stdout must be JSON only
    for (const line of lines) if (line !== '') entries.push(JSON.parse(line) as LogEntry);
    for (const w of waiters.splice(0)) w();
  });
  child.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
  const text = () => [...entries.map((e) => e.msg), stderr].join('\n');
  const waitFor = (pick: (e: LogEntry) => boolean, timeoutMs = 60_000) =>
    new Promise<LogEntry>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`no such log line within ${timeoutMs} ms:\n${text()}`)), timeoutMs);
      const onExit = (code: number | null) => reject(new Error(`serve exited with ${code}:\n${text()}`));
      child.once('exit', onExit);
      const check = () => {
        const hit = entries.find(pick);
        if (!hit) return void waiters.push(check);
        clearTimeout(timer);
        child.off('exit', onExit);
        resolve(hit);
      };
      check();
    });
  const stop = async () => {
    if (child.exitCode !== null) return;
    const exited = new Promise((r) => child.once('exit', r));
    child.kill('SIGTERM');
    await exited;
  };
  try {
    const serving = await waitFor((e) => /^serving .* at http/.test(e.msg));
    return { child, url: /at (http\S+)/.exec(serving.msg)![1], entries, text, waitFor, stop };
  } catch (err) {
    child.kill('SIGTERM');
    throw err;
  }
}
