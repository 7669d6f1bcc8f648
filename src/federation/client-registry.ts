import type { Redis } from 'ioredis';
import type { FederationKeys } from './federation-keys.js';

/** What a client worker announces about itself with every heartbeat. */
export interface ClientHeartbeat {
  id: string;
  /** baseModelFingerprint() of the client's model folder. */
  fingerprint: string;
  /** ms since the epoch. */
  lastSeen: number;
  busy: boolean;
  /** What the client is training now, for the clients listing. */
  current?: { job: string; round: number };
  host?: string;
  pid?: number;
}

/** A heartbeat lives this many intervals: one missed beat is tolerated, two mean gone. */
const TTL_INTERVALS = 3;

/**
 * Liveness of client workers by heartbeat: each client refreshes `<p>:fed:client:<id>` with a
 * TTL; the coordinator reads the live ones. Nothing needs deregistering: a killed client's key
 * simply expires.
 */
export class ClientRegistry {
  private readonly redis: Redis;
  private readonly keys: FederationKeys;

  constructor(redis: Redis, keys: FederationKeys) {
    this.redis = redis;
    this.keys = keys;
  }

  async beat(hb: ClientHeartbeat, intervalMs: number): Promise<void> {
    await this.redis
      .multi()
      .set(this.keys.client(hb.id), JSON.stringify(hb), 'PX', intervalMs * TTL_INTERVALS)
      .sadd(this.keys.clients(), hb.id)
      .exec();
  }

  async remove(id: string): Promise<void> {
    await this.redis.del(this.keys.client(id));
  }

  /** Clients whose heartbeat has not expired, sorted by id. */
  async live(): Promise<ClientHeartbeat[]> {
    const ids = (await this.redis.smembers(this.keys.clients())).sort();
    if (ids.length === 0) return [];
    const values = await this.redis.mget(ids.map((id) => this.keys.client(id)));
    return values.filter((v): v is string => v !== null).map((v) => JSON.parse(v) as ClientHeartbeat);
  }
}
