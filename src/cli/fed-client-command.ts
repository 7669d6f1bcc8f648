import cliProgress from 'cli-progress';
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
}

const label = (t: TrainTask) => `job ${t.job} round ${t.round}${t.attempt > 1 ? `.${t.attempt}` : ''}`;

/**
 * `lora-gateway fed-client`: one federation client worker in this process, until SIGINT or
 * SIGTERM. On a terminal it shows a progress bar of local training (step, loss) with
 * cli-progress; elsewhere (logs, pipes) it prints plain lines, about ten per task.
 */
export async function runFedClient(options: FedClientOptions): Promise<void> {
  let bar: cliProgress.SingleBar | undefined;
  let lastLogged = 0;
  const worker = await FedClientWorker.start({
    redisUrl: options.redisUrl,
    prefix: options.prefix,
    clientId: options.clientId,
    modelDir: options.modelDir,
    dataPath: options.dataPath,
    log: options.log,
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
