/**
 * Every Redis key and BullMQ queue name federation uses, in one place. All live under one
 * prefix (default `lora-gateway`), so tests and several deployments can share a Redis.
 *
 *   queues   fed-control            coordinator: round starts, deadlines, schedule ticks
 *            fed-aggregate          one parent job per round attempt (the flow's root)
 *            fed-client-<client>    one queue per client: BullMQ cannot address a worker, a queue can
 *   keys     <p>:fed:jobs                         sorted set of job ids by creation time
 *            <p>:fed:job:<job>                    the job record (JSON)
 *            <p>:fed:global:<job>:<round>         the global state clients start round <round> from
 *            <p>:fed:update:<job>:<round>:<attempt>:<client>   a client's update (safetensors, TTL)
 *            <p>:fed:kept:<job>:<round>:<client>  an accepted update, kept for audit (--federation-keep-updates)
 *            <p>:fed:clients                      set of client ids ever seen
 *            <p>:fed:client:<client>              heartbeat (JSON, expires when the client stops)
 */
export class FederationKeys {
  readonly prefix: string;

  constructor(prefix = 'lora-gateway') {
    this.prefix = prefix;
  }

  static readonly controlQueue = 'fed-control';
  static readonly aggregateQueue = 'fed-aggregate';

  static clientQueue(client: string): string {
    return `fed-client-${client}`;
  }

  jobs(): string {
    return `${this.prefix}:fed:jobs`;
  }

  job(job: string): string {
    return `${this.prefix}:fed:job:${job}`;
  }

  global(job: string, round: number): string {
    return `${this.prefix}:fed:global:${job}:${round}`;
  }

  update(job: string, round: number, attempt: number, client: string): string {
    return `${this.prefix}:fed:update:${job}:${round}:${attempt}:${client}`;
  }

  kept(job: string, round: number, client: string): string {
    return `${this.prefix}:fed:kept:${job}:${round}:${client}`;
  }

  /** A DP job's 32-byte noise key: server-side only, never in the job record or any response. */
  noiseKey(job: string): string {
    return `${this.prefix}:fed:noise-key:${job}`;
  }

  clients(): string {
    return `${this.prefix}:fed:clients`;
  }

  client(client: string): string {
    return `${this.prefix}:fed:client:${client}`;
  }
}

/** BullMQ job ids, deterministic so that re-adding after a crash finds the existing job. */
export function roundJobId(job: string, round: number, attempt: number): string {
  return `${job}.r${round}.a${attempt}`;
}

export function trainJobId(job: string, round: number, attempt: number, client: string): string {
  return `${job}.r${round}.a${attempt}.${client}`;
}
