import { createCipheriv, createHash } from 'node:crypto';

/**
 * Gaussian noise for differential privacy from a keyed cryptographic stream: AES-256-CTR over
 * zeros, keyed by the job's secret noise key and a nonce from the round's label, gives 53-bit
 * uniforms, and Box–Muller turns pairs of them into normals (in float64). A seeded PRNG with a
 * 32-bit state would let anyone who guesses the state subtract the noise again; with a 256-bit
 * secret key that is infeasible. Being a function of (key, label), a round aggregated again
 * after a crash adds exactly the same noise, so the published version is the same.
 */
export class GaussianNoise {
  private readonly cipher;
  private spare: number | undefined;
  private buf = Buffer.alloc(0);
  private pos = 0;

  constructor(key: Uint8Array, label: string) {
    if (key.length !== 32) throw new Error(`noise key must be 32 bytes, got ${key.length}`);
    const iv = createHash('sha256').update(label).digest().subarray(0, 16);
    this.cipher = createCipheriv('aes-256-ctr', key, iv);
  }

  /** Uniform in (0, 1) with 53 random bits (never 0, so log(u) is finite). */
  uniform(): number {
    if (this.pos + 8 > this.buf.length) {
      this.buf = this.cipher.update(Buffer.alloc(8 * 4096));
      this.pos = 0;
    }
    const hi = this.buf.readUInt32LE(this.pos) >>> 5;
    const lo = this.buf.readUInt32LE(this.pos + 4) >>> 6;
    this.pos += 8;
    return (hi * 67108864 + lo + 0.5) / 9007199254740992;
  }

  /** One standard normal. */
  normal(): number {
    if (this.spare !== undefined) {
      const s = this.spare;
      this.spare = undefined;
      return s;
    }
    const r = Math.sqrt(-2 * Math.log(this.uniform()));
    const t = 2 * Math.PI * this.uniform();
    this.spare = r * Math.sin(t);
    return r * Math.cos(t);
  }

  /** Adds N(0, std²) to every element of x, in place. */
  addTo(x: Float64Array, std: number): void {
    for (let i = 0; i < x.length; i++) x[i] += std * this.normal();
  }
}
