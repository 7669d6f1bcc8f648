import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { LoraGatewayError } from '../../src/errors.js';
import { parseModelConfig } from '../../src/model/architecture/model-config.js';
import { SMOLLM2_135M_SHAPE } from '../../src/model/architecture/model-shapes.js';
import { resolvePeftConfig } from '../../src/model/lora/peft-config.js';
import { SeededRandom } from '../../src/model/synthetic/seeded-random.js';
import { PagePool, type PageKind } from '../../src/pager/page-pool.js';
import { adapterPages, kvPagesPerToken, loraModulePages, pageBytes } from '../../src/pager/page-sizes.js';

const smol = parseModelConfig(SMOLLM2_135M_SHAPE);

describe('page sizes', () => {
  test('a page is one hidden-size float32 vector', () => {
    assert.equal(pageBytes(smol), 576 * 4);
  });

  test('one token of KV takes a K page and a V page per layer (kv width 192 rounds up to one page)', () => {
    assert.equal(kvPagesPerToken(smol), 30 * 2);
    const wideKv = parseModelConfig({
      architectures: ['LlamaForCausalLM'],
      hidden_size: 64,
      intermediate_size: 64,
      num_hidden_layers: 2,
      vocab_size: 10,
      num_attention_heads: 2,
      head_dim: 48,
    });
    assert.equal(kvPagesPerToken(wideKv), 2 * 2 * 2, 'kv width 96 > hidden 64 takes two pages each for K and V');
  });

  test('an adapted matrix takes r rows of A and r columns of B, each rounded up to whole pages', () => {
    assert.equal(loraModulePages(smol, 'q_proj', 16), 16 * (1 + 1));
    assert.equal(loraModulePages(smol, 'k_proj', 8), 8 * (1 + 1));
    assert.equal(loraModulePages(smol, 'up_proj', 4), 4 * (1 + 3), 'a column of B of length 1536 needs 3 pages');
    assert.equal(loraModulePages(smol, 'down_proj', 4), 4 * (3 + 1));
    const specs = resolvePeftConfig({ r: 8, lora_alpha: 16, target_modules: ['q_proj', 'v_proj'] }, smol, 64);
    assert.equal(adapterPages(smol, specs), 30 * 2 * 8 * 2);
  });
});

describe('PagePool', () => {
  test('reservations are all-or-nothing and never exceed the budget', () => {
    const pool = new PagePool(100);
    assert.equal(pool.reserve('kv:a', 'kv', 60), true);
    assert.equal(pool.reserve('adapter:x@1', 'adapter', 50), false);
    assert.equal(pool.inUse(), 60);
    assert.equal(pool.reserve('adapter:x@1', 'adapter', 40), true);
    assert.equal(pool.free, 0);
    assert.equal(pool.reserve('kv:a', 'kv', 1), false);
    assert.equal(pool.held('kv:a'), 60);
  });

  test('release returns exactly the owner’s pages, by kind', () => {
    const pool = new PagePool(10);
    pool.reserve('kv:a', 'kv', 3);
    pool.reserve('kv:a', 'kv', 2);
    pool.reserve('adapter:x@1', 'adapter', 4);
    assert.equal(pool.inUse('kv'), 5);
    assert.equal(pool.inUse('adapter'), 4);
    assert.equal(pool.release('kv:a'), 5);
    assert.equal(pool.release('kv:a'), 0);
    assert.equal(pool.inUse('kv'), 0);
    assert.deepEqual(pool.owners('adapter'), [{ owner: 'adapter:x@1', pages: 4 }]);
  });

  test('an owner cannot switch kinds, and bad counts are refused', () => {
    const pool = new PagePool(10);
    pool.reserve('o', 'kv', 1);
    assert.throws(() => pool.reserve('o', 'adapter', 1), LoraGatewayError);
    assert.throws(() => pool.reserve('p', 'kv', -1), LoraGatewayError);
    assert.throws(() => pool.reserve('p', 'kv', 1.5), LoraGatewayError);
    assert.throws(() => new PagePool(-3), LoraGatewayError);
  });

  test('under random reserve/release traffic, in-use always equals the sum of holdings and stays within capacity', () => {
    const rng = new SeededRandom(99);
    const pool = new PagePool(500);
    const model = new Map<string, { kind: PageKind; pages: number }>();
    for (let i = 0; i < 5000; i++) {
      const owner = `o${rng.int(40)}`;
      if (rng.next() < 0.35) {
        assert.equal(pool.release(owner), model.get(owner)?.pages ?? 0);
        model.delete(owner);
      } else {
        const kind: PageKind = owner.charCodeAt(owner.length - 1) % 2 ? 'kv' : 'adapter';
        const pages = rng.int(60);
        const fits = pages <= 500 - [...model.values()].reduce((s, h) => s + h.pages, 0);
        assert.equal(pool.reserve(owner, kind, pages), fits);
        if (fits) model.set(owner, { kind, pages: (model.get(owner)?.pages ?? 0) + pages });
      }
      const sum = (k?: PageKind) => [...model.values()].filter((h) => !k || h.kind === k).reduce((s, h) => s + h.pages, 0);
      assert.equal(pool.inUse(), sum());
      assert.equal(pool.inUse('kv'), sum('kv'));
      assert.ok(pool.inUse() <= pool.capacity);
    }
  });
});
