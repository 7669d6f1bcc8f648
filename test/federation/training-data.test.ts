import assert from 'node:assert/strict';
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { FederationError } from '../../src/errors.js';
import { readClientTexts, splitHeldOut, tokenWindows, windowsFromIds, type WindowTokenizer } from '../../src/federation/training-data.js';
import { buildDemoTokenizer } from '../../src/model/tokenizer/demo-tokenizer.js';
import { TextTokenizer } from '../../src/model/tokenizer/tokenizer.js';

let dir: string;
before(async () => {
  dir = await mkdtemp(join(tmpdir(), 'training-data-'));
});
after(async () => {
  await rm(dir, { recursive: true, force: true });
});

async function write(rel: string, content: string): Promise<string> {
  const p = join(dir, rel);
  await mkdir(join(p, '..'), { recursive: true });
  await writeFile(p, content);
  return p;
}

function isDataError(pattern: RegExp) {
  return (err: unknown) => err instanceof FederationError && err.code === 'FED_DATA_INVALID' && pattern.test(err.message);
}

describe('readClientTexts', () => {
  test('a .txt file is one document, read whole', async () => {
    const p = await write('one.txt', 'first line\nsecond line\n');
    assert.deepEqual(await readClientTexts(p), ['first line\nsecond line\n']);
  });

  test('a .jsonl file gives each line’s text, skipping blank lines', async () => {
    const p = await write('docs.jsonl', '{"text": "alpha", "id": 1}\n\n  \n{"text":"beta"}\r\n');
    assert.deepEqual(await readClientTexts(p), ['alpha', 'beta']);
  });

  test('a folder gives every .txt and .jsonl file under it, recursively, sorted by path; other files are ignored', async () => {
    await write('tree/b.txt', 'B');
    await write('tree/a/z.jsonl', '{"text": "AZ1"}\n{"text": "AZ2"}\n');
    await write('tree/a/y.txt', 'AY');
    await write('tree/notes.md', 'ignored');
    await write('tree/c/empty.txt', '');
    assert.deepEqual(await readClientTexts(join(dir, 'tree')), ['AY', 'AZ1', 'AZ2', 'B']);
  });

  test('a JSONL line that is not JSON names the file and line', async () => {
    const p = await write('bad.jsonl', '{"text": "ok"}\n{"text": oops}\n');
    await assert.rejects(readClientTexts(p), isDataError(/bad\.jsonl:2: not JSON/));
  });

  test('a JSONL line without a string text field names the file and line', async () => {
    const p = await write('notext.jsonl', '{"text": "ok"}\n\n{"body": "x"}\n');
    await assert.rejects(readClientTexts(p), isDataError(/notext\.jsonl:3: expected an object with a string "text" field/));
    const q = await write('numtext.jsonl', '[1]\n');
    await assert.rejects(readClientTexts(q), isDataError(/numtext\.jsonl:1:/));
  });

  test('no text at all, an unknown extension or a missing path is FED_DATA_INVALID', async () => {
    await write('empty/a.txt', '  \n');
    await write('empty/b.jsonl', '\n');
    await assert.rejects(readClientTexts(join(dir, 'empty')), isDataError(/no training text/));
    await mkdir(join(dir, 'nothing'));
    await assert.rejects(readClientTexts(join(dir, 'nothing')), isDataError(/no training text/));
    await assert.rejects(readClientTexts(await write('data.csv', 'a,b')), isDataError(/data\.csv: expected a \.txt file/));
    await assert.rejects(readClientTexts(join(dir, 'missing.txt')), isDataError(/missing\.txt: cannot read/));
  });
});

describe('windows', () => {
  test('windowsFromIds cuts non-overlapping windows of seqLen+1 and drops the partial tail', () => {
    const ids = Array.from({ length: 11 }, (_, i) => 100 + i);
    const w = windowsFromIds(ids, 3);
    assert.deepEqual(
      w.map((x) => [...x]),
      [
        [100, 101, 102, 103],
        [104, 105, 106, 107],
      ],
    );
    assert.ok(w.every((x) => x instanceof Int32Array));
    assert.deepEqual(windowsFromIds(ids.slice(0, 3), 3), []);
    assert.equal(windowsFromIds(ids, 10).length, 1);
  });

  test('tokenWindows encodes with special tokens and puts one EOS after each document', () => {
    // BOS = 1, EOS = 2 ('#' spells the EOS token inside a text), letters a.. = 7..
    const stub: WindowTokenizer = {
      eosTokenIds: [2, 3],
      encode: (text, opts) => {
        assert.equal(opts?.addSpecialTokens, true);
        return [1, ...[...text].map((c) => (c === '#' ? 2 : c.charCodeAt(0) - 90))];
      },
    };
    // stream: 1 7 8 2 | 1 9 10 2 (already ends in EOS: none added) | 1 11 2
    const w = tokenWindows(stub, ['ab', 'cd#', 'e'], 2);
    assert.deepEqual(
      w.map((x) => [...x]),
      [
        [1, 7, 8],
        [2, 1, 9],
        [10, 2, 1],
      ],
      'three windows of 3; the tail [11, 2] is dropped',
    );
    assert.throws(() => tokenWindows(stub, ['a'], 8), isDataError(/3 tokens, fewer than one window of seqLen\+1 = 9/));
    assert.throws(() => tokenWindows({ ...stub, eosTokenIds: [] }, ['abc'], 1), isDataError(/no EOS/));
  });

  test('tokenWindows with the demo tokenizer starts documents with BOS and separates them with EOS', () => {
    const demo = buildDemoTokenizer();
    const tok = TextTokenizer.fromJson(demo.tokenizerJson, demo.tokenizerConfig, demo.generationConfig);
    const texts = ['The gateway serves one base model.', 'Each adapter changes only a few matrices.'];
    const stream = texts.flatMap((t) => [...tok.encode(t), tok.eosTokenIds[0]]);
    assert.equal(stream[0], tok.bosTokenId);
    const seqLen = 5;
    const w = tokenWindows(tok, texts, seqLen);
    assert.equal(w.length, Math.floor(stream.length / (seqLen + 1)));
    assert.deepEqual(w.flatMap((x) => [...x]), stream.slice(0, w.length * (seqLen + 1)));
  });

  test('splitHeldOut is deterministic per seed, disjoint, complete and order-preserving', () => {
    const windows = Array.from({ length: 20 }, (_, i) => Int32Array.of(i, i + 1));
    const a = splitHeldOut(windows, 0.25, 7);
    const b = splitHeldOut(windows, 0.25, 7);
    const c = splitHeldOut(windows, 0.25, 8);
    const ids = (ws: Int32Array[]) => ws.map((w) => w[0]);
    assert.equal(a.heldOut.length, 5);
    assert.equal(a.train.length, 15);
    assert.deepEqual(ids(a.heldOut), ids(b.heldOut));
    assert.notDeepEqual(ids(a.heldOut), ids(c.heldOut));
    assert.deepEqual([...ids(a.train), ...ids(a.heldOut)].sort((x, y) => x - y), ids(windows));
    assert.deepEqual(ids(a.train), [...ids(a.train)].sort((x, y) => x - y));
    assert.equal(splitHeldOut(windows, 0, 1).heldOut.length, 0);
    assert.equal(splitHeldOut(windows.slice(0, 2), 0.01, 1).heldOut.length, 1, 'a positive fraction holds out at least one window');
    assert.equal(splitHeldOut(windows.slice(0, 1), 0.5, 1).train.length, 1, 'a single window stays in training');
    assert.throws(() => splitHeldOut(windows, 1, 1), isDataError(/fraction/));
  });
});
