import cliProgress from 'cli-progress';
import { LoraGatewayError } from '../errors.js';
import { FedClientWorker } from '../federation/client-worker.js';
import type { TrainTask } from '../federation/train-task.js';

export interface FedClientOptions {
  redisUrl: string;
  prefix?: string;
  clientId: string;
  modelDir: string;
  dataPath: string;
  log: (line: string) => void;
  /** Draw a progress bar (stderr is a terminal); otherwise one log line per reported step. */
  tty: boolean;
  /** `--poison scale:K`: a test mode that uploads corrupted updates (robust aggregation tests). */
  poison?: string;
}

/** Parses `--poison scale:K` (K a finite number; sign-flip is scale:-1). */
export function parsePoison(v: string | undefined): { scale: number } | undefined {
  if (v === undefined) return undefined;
  const m = /^scale:(-?[0-9.eE+-]+)$/.exec(v);
  const k = m ? Number(m[1]) : NaN;
  if (!Number.isFinite(k)) throw new LoraGatewayError('REQUEST_INVALID', `--poison must be scale:K with K a number (e.g. scale:100, scale:-1), got '${v}'`);
  return { scale: k };
}

const label = (t: TrainTask) => `job ${t.job} round ${t.round}${t.attempt > 1 ? `.${t.attempt}` : ''}`;

/**
 * `lora-gateway fed-client`: one federation client worker in this process, until SIGINT or
 * SIGTERM. On a terminal it shows a progress bar of local training (step, loss) with
 * cli-progress; elsewhere (logs, pipes) it prints plain lines, about ten per task.
 */
export async function runFedClient(options: FedClientOptions): Promise<void> {
  const poison = parsePoison(options.poison);
  if (poison) options.log(`fed-client: --poison scale:${poison.scale}: this client uploads corrupted updates (a robust-aggregation test mode)`);
  let bar: cliProgress.SingleBar | undefined;
  let lastLogged = 0;
  const worker = await FedClientWorker.start({
    redisUrl: options.redisUrl,
    prefix: options.prefix,
    clientId: options.clientId,
    modelDir: options.modelDir,
    dataPath: options.dataPath,
    log: options.log,
    poison,
    onStep: (task, step, steps, loss) => {
      if (options.tty) {
        if (!bar) {
          bar = new cliProgress.SingleBar(
            { format: `${label(task)} [{bar}] {value}/{total} steps | loss {loss}`, stream: process.stderr, hideCursor: true },
            cliProgress.Presets.shades_classic,
          );
          bar.start(steps, 0, { loss: '-' });
        }
        bar.update(step, { loss: loss.toFixed(4) });
      } else if (step === 1 || step === steps || step - lastLogged >= Math.max(1, Math.ceil(steps / 10))) {
        lastLogged = step;
        options.log(`${label(task)}: step ${step}/${steps} loss ${loss.toFixed(4)}`);
      }
    },
    onTaskEnd: (task, outcome) => {
      bar?.stop();
      bar = undefined;
      lastLogged = 0;
      if (outcome.ref) {
        options.log(`${label(task)}: uploaded ${outcome.ref.bytes} bytes (${outcome.ref.num_examples} examples, train loss ${outcome.ref.train_loss.toFixed(4)})`);
      } else options.log(`${label(task)}: failed: ${outcome.error}`);
    },
  });
  await new Promise<void>((done) => {
    const stop = () => void worker.close().then(done);
    process.once('SIGINT', stop);
    process.once('SIGTERM', stop);
  });
}
