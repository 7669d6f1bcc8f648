import assert from 'node:assert/strict';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { ModelFormatError } from '../../../src/errors.js';
import { BOS_TOKEN, buildDemoTokenizer, EOS_TOKEN, IM_END_TOKEN, IM_START_TOKEN } from '../../../src/model/tokenizer/demo-tokenizer.js';
import { TextTokenizer } from '../../../src/model/tokenizer/tokenizer.js';

const demo = buildDemoTokenizer();
const utf8 = (s: string) => new TextEncoder().encode(s).length;

const ASCII_TEXTS = [
  'The gateway serves the adapter.',
  'Hello .  two  spaces, a tab\tand a newline\n',
  "it's what we'll do, isn't it?",
  ' leading space and trailing space ',
  '12345 + 678 = 13023',
];
const MULTIBYTE_TEXTS = ['café', 'naïve', '日本', 'a café in 日本 is naïve 🙂', 'Ünïcödé ☃ 𝔘 ñ', '日本語のテキスト'];

async function writeTokenizerFolder(dir: string, files: Record<string, string>): Promise<void> {
  for (const [name, text] of Object.entries(files)) await writeFile(join(dir, name), text);
}

function assertModelFormatError(err: unknown, code: string, fileEnd: string): true {
  assert.ok(err instanceof ModelFormatError, `expected ModelFormatError, got ${String(err)}`);
  assert.equal(err.code, code);
  assert.ok(err.file.endsWith(fileEnd), `error names ${err.file}, expected …${fileEnd}`);
  return true;
}

/** Streams ids one by one; returns each push's output and the flush output. */
function streamAll(tok: TextTokenizer, ids: number[], skipSpecialTokens?: boolean): { pieces: string[]; tail: string } {
  const stream = tok.createStreamDecoder({ skipSpecialTokens });
  const pieces = ids.map((id) => stream.push(id));
  return { pieces, tail: stream.flush() };
}

/**
 * A minimal Llama-2-style (SentencePiece) tokenizer.json: "▁" marks spaces, unknown
 * characters fall back to <0xNN> byte tokens, and the decoder strips the one leading space
 * of the whole text. A stream decoder that decoded each token alone would drop the space
 * before every word; this is what vLLM's prefix window exists for.
 */
function sentencePieceTokenizer(): TextTokenizer {
  const vocab: Record<string, number> = { '<unk>': 0, '<s>': 1, '</s>': 2 };
  for (let b = 0; b < 256; b++) vocab[`<0x${b.toString(16).toUpperCase().padStart(2, '0')}>`] = 3 + b;
  for (const t of ['▁', 'a', 'b', '▁a', '▁b']) vocab[t] = Object.keys(vocab).length;
  const json = {
    version: '1.0',
    added_tokens: ['<unk>', '<s>', '</s>'].map((content, id) => ({ id, content, single_word: false, lstrip: false, rstrip: false, normalized: false, special: true })),
    normalizer: { type: 'Sequence', normalizers: [{ type: 'Prepend', prepend: '▁' }, { type: 'Replace', pattern: { String: ' ' }, content: '▁' }] },
    pre_tokenizer: null,
    post_processor: {
      type: 'TemplateProcessing',
      single: [{ SpecialToken: { id: '<s>', type_id: 0 } }, { Sequence: { id: 'A', type_id: 0 } }],
      pair: [],
      special_tokens: { '<s>': { id: '<s>', ids: [1], tokens: ['<s>'] } },
    },
    decoder: {
      type: 'Sequence',
      decoders: [{ type: 'Replace', pattern: { String: '▁' }, content: ' ' }, { type: 'ByteFallback' }, { type: 'Fuse' }, { type: 'Strip', content: ' ', start: 1, stop: 0 }],
    },
    model: { type: 'BPE', unk_token: '<unk>', fuse_unk: true, byte_fallback: true, ignore_merges: false, vocab, merges: [['▁', 'a'], ['▁', 'b']] },
  };
  return TextTokenizer.fromJson(json, { bos_token: '<s>', eos_token: '</s>' });
}

describe('TextTokenizer on the demo tokenizer files', () => {
  let dir: string;
  let tok: TextTokenizer;

  before(async () => {
    dir = await mkdtemp(join(tmpdir(), 'lora-gateway-tokenizer-'));
    await writeTokenizerFolder(dir, {
      'tokenizer.json': JSON.stringify(demo.tokenizerJson),
      'tokenizer_config.json': JSON.stringify(demo.tokenizerConfig, null, 2),
      'generation_config.json': JSON.stringify(demo.generationConfig, null, 2),
    });
    tok = await TextTokenizer.load(dir);
  });

  after(async () => {
    await rm(dir, { recursive: true, force: true });
  });

  test('load() reads the real files: vocab size, BOS id, chat template', () => {
    assert.equal(tok.vocabSize, demo.vocabSize);
    assert.equal(tok.vocabSize, 4 + 256 + 200);
    assert.equal(tok.bosTokenId, 0);
    assert.match(tok.chatTemplate ?? '', /<\|im_start\|>/);
    assert.ok(tok.isSpecial(0) && tok.isSpecial(3));
    assert.equal(tok.isSpecial(4), false);
  });

  test('encode→decode returns ASCII text unchanged, with no tokenization-space cleanup', () => {
    for (const text of ASCII_TEXTS) assert.equal(tok.decode(tok.encode(text)), text);
  });

  test('encode→decode returns multi-byte text (2-, 3- and 4-byte UTF-8) unchanged', () => {
    for (const text of MULTIBYTE_TEXTS) {
      assert.equal(tok.decode(tok.encode(text)), text);
      assert.equal(tok.decode(tok.encode(text, { addSpecialTokens: false })), text);
    }
  });

  test('addSpecialTokens (the default) prepends BOS once; false leaves it out', () => {
    const withBos = tok.encode('Hello world');
    const without = tok.encode('Hello world', { addSpecialTokens: false });
    assert.equal(withBos[0], tok.bosTokenId);
    assert.deepEqual(withBos.slice(1), without);
    assert.ok(!without.includes(tok.bosTokenId!));
    assert.deepEqual(tok.encode(''), [tok.bosTokenId]);
  });

  test('trained merges are used: common words encode to fewer ids than their bytes', () => {
    for (const word of [' the', ' adapter', ' and', 'The']) {
      const ids = tok.encode(word, { addSpecialTokens: false });
      assert.ok(ids.length < utf8(word), `'${word}': ${ids.length} ids for ${utf8(word)} bytes`);
    }
    // Whole sentences from the corpus compress well, too.
    const sentence = 'The server averages the updates into the next version of the adapter.';
    assert.ok(tok.encode(sentence, { addSpecialTokens: false }).length * 2 < utf8(sentence));
  });

  test('special-token strings encode to their single ids; decode skips them unless asked', () => {
    const text = `${IM_START_TOKEN}user\nhi${IM_END_TOKEN}`;
    const ids = tok.encode(text, { addSpecialTokens: false });
    assert.equal(ids[0], 2);
    assert.equal(ids.at(-1), 3);
    assert.equal(tok.decode(ids), 'user\nhi');
    assert.equal(tok.decode(ids, { skipSpecialTokens: false }), text);
    assert.equal(tok.decode([0, ...ids], { skipSpecialTokens: false }), BOS_TOKEN + text);
  });

  test('decode skips ids outside the vocab and returns "" for no ids', () => {
    const ids = tok.encode('café', { addSpecialTokens: false });
    assert.equal(tok.decode([tok.vocabSize, ...ids, tok.vocabSize + 100]), 'café');
    assert.equal(tok.decode([]), '');
    assert.equal(tok.decode([tok.bosTokenId!]), '');
  });

  test('eosTokenIds is the deduplicated union of eos_token and generation_config eos_token_id', () => {
    assert.deepEqual(tok.eosTokenIds, [1, 3]);
  });

  test('StreamDecoder over multi-byte text split across byte tokens never emits U+FFFD and concatenates to decode()', () => {
    let withheld = 0;
    for (const text of [...MULTIBYTE_TEXTS, ...ASCII_TEXTS]) {
      for (const skip of [true, false]) {
        const ids = tok.encode(text);
        const { pieces, tail } = streamAll(tok, ids, skip);
        for (const piece of pieces) assert.ok(!piece.includes('\uFFFD'), `'${text}': piece ${JSON.stringify(piece)}`);
        assert.equal(pieces.join('') + tail, tok.decode(ids, { skipSpecialTokens: skip }));
        assert.equal(tail, '');
        withheld += pieces.filter((p, i) => p === '' && !tok.isSpecial(ids[i])).length;
      }
    }
    // The test is only meaningful if some character's bytes really were split over tokens.
    assert.ok(withheld > 0, 'no multi-byte character was split across tokens');
  });

  test('StreamDecoder splits 日 (3 bytes, 3 tokens) into "", "", "日"', () => {
    const ids = tok.encode('日', { addSpecialTokens: false });
    assert.equal(ids.length, 3);
    assert.deepEqual(streamAll(tok, ids).pieces, ['', '', '日']);
  });

  test('StreamDecoder emits a word as soon as it is complete, keeping its leading space', () => {
    const ids = tok.encode('The adapter', { addSpecialTokens: false });
    const { pieces } = streamAll(tok, ids);
    assert.equal(pieces.join(''), 'The adapter');
    assert.ok(pieces.some((p) => p.startsWith(' ')), `pieces ${JSON.stringify(pieces)}`);
  });

  test('StreamDecoder flushes a truncated UTF-8 tail exactly as decode() shows it', () => {
    const ids = [...tok.encode('ok 日', { addSpecialTokens: false }).slice(0, -1)];
    const { pieces, tail } = streamAll(tok, ids);
    assert.ok(!pieces.join('').includes('\uFFFD'));
    assert.ok(tail.includes('\uFFFD'));
    assert.equal(pieces.join('') + tail, tok.decode(ids));
  });

  test('StreamDecoder rejects push() after flush()', () => {
    const stream = tok.createStreamDecoder();
    stream.flush();
    assert.throws(() => stream.push(5), /after flush/);
  });
});

describe('StreamDecoder on a SentencePiece-style tokenizer', () => {
  const tok = sentencePieceTokenizer();

  test('keeps the space before each word that decoding the token alone would strip', () => {
    const ids = tok.encode('a b');
    assert.deepEqual(ids, [1, 262, 263]); // <s>, ▁a, ▁b
    assert.deepEqual(streamAll(tok, ids).pieces, ['', 'a', ' b']);
  });

  test('byte-fallback characters are withheld until complete and the stream equals decode()', () => {
    for (const text of ['a 日 b', 'ab  ba', '日本 a']) {
      const ids = tok.encode(text);
      const { pieces, tail } = streamAll(tok, ids);
      assert.equal(tok.decode(ids), text);
      assert.ok(pieces.every((p) => !p.includes('\uFFFD')), JSON.stringify(pieces));
      assert.equal(pieces.join('') + tail, text);
    }
  });
});

describe('TextTokenizer.fromJson config handling', () => {
  const config = demo.tokenizerConfig as Record<string, unknown>;

  test('eosTokenIds unions eos_token {content} with a numeric eos_token_id, deduplicated', () => {
    const tok = TextTokenizer.fromJson(demo.tokenizerJson, { ...config, eos_token: { content: IM_END_TOKEN } }, { eos_token_id: 1 });
    assert.deepEqual(tok.eosTokenIds, [3, 1]);
    const same = TextTokenizer.fromJson(demo.tokenizerJson, { ...config, eos_token: EOS_TOKEN }, { eos_token_id: [1, 1, 3] });
    assert.deepEqual(same.eosTokenIds, [1, 3]);
  });

  test('without config files there is no EOS, no template, and BOS comes from nowhere', () => {
    const tok = TextTokenizer.fromJson(demo.tokenizerJson);
    assert.deepEqual(tok.eosTokenIds, []);
    assert.equal(tok.bosTokenId, undefined);
    assert.equal(tok.chatTemplate, undefined);
    // The post_processor still adds BOS: tokenizer.json alone decides that.
    assert.equal(tok.encode('x')[0], 0);
  });

  test('bos_token_id falls back to generation_config when tokenizer_config has none', () => {
    const tok = TextTokenizer.fromJson(demo.tokenizerJson, {}, { bos_token_id: 0, eos_token_id: 1 });
    assert.equal(tok.bosTokenId, 0);
    assert.deepEqual(tok.eosTokenIds, [1]);
  });

  test('chat_template given as a list of {name, template} yields the "default" entry', () => {
    const chat_template = [
      { name: 'tool_use', template: 'TOOLS' },
      { name: 'default', template: 'CHAT' },
    ];
    assert.equal(TextTokenizer.fromJson(demo.tokenizerJson, { chat_template }).chatTemplate, 'CHAT');
  });

  test('an eos_token that is not in the vocab gives TOKENIZER_INVALID naming tokenizer_config.json', () => {
    assert.throws(
      () => TextTokenizer.fromJson(demo.tokenizerJson, { eos_token: '</s>' }),
      (err) => assertModelFormatError(err, 'TOKENIZER_INVALID', 'tokenizer_config.json'),
    );
  });

  test('a non-integer eos_token_id gives TOKENIZER_INVALID naming generation_config.json', () => {
    assert.throws(
      () => TextTokenizer.fromJson(demo.tokenizerJson, {}, { eos_token_id: ['x'] }),
      (err) => assertModelFormatError(err, 'TOKENIZER_INVALID', 'generation_config.json'),
    );
  });

  test('tokenizer.json without a model gives TOKENIZER_INVALID', () => {
    const { model: _model, ...noModel } = demo.tokenizerJson as Record<string, unknown>;
    assert.throws(() => TextTokenizer.fromJson(noModel), (err) => assertModelFormatError(err, 'TOKENIZER_INVALID', 'tokenizer.json'));
  });

  test('an unknown model type gives TOKENIZER_INVALID', () => {
    const json = { ...(demo.tokenizerJson as Record<string, unknown>), model: { type: 'Nope' } };
    assert.throws(() => TextTokenizer.fromJson(json), (err) => assertModelFormatError(err, 'TOKENIZER_INVALID', 'tokenizer.json'));
  });
});

describe('TextTokenizer.load errors name the file', () => {
  let dir: string;

  before(async () => {
    dir = await mkdtemp(join(tmpdir(), 'lora-gateway-tokenizer-bad-'));
  });

  after(async () => {
    await rm(dir, { recursive: true, force: true });
  });

  test('a missing tokenizer.json gives MODEL_FILE_MISSING', async () => {
    await assert.rejects(TextTokenizer.load(join(dir, 'nowhere')), (err) => assertModelFormatError(err, 'MODEL_FILE_MISSING', 'tokenizer.json'));
  });

  test('a tokenizer.json that is not JSON gives TOKENIZER_INVALID', async () => {
    const folder = await mkdtemp(join(dir, 'not-json-'));
    await writeTokenizerFolder(folder, { 'tokenizer.json': '{"model": {' });
    await assert.rejects(TextTokenizer.load(folder), (err) => assertModelFormatError(err, 'TOKENIZER_INVALID', join(folder, 'tokenizer.json')));
  });

  test('a tokenizer.json without a model gives TOKENIZER_INVALID', async () => {
    const folder = await mkdtemp(join(dir, 'no-model-'));
    await writeTokenizerFolder(folder, { 'tokenizer.json': JSON.stringify({ version: '1.0', added_tokens: [] }) });
    await assert.rejects(TextTokenizer.load(folder), (err) => assertModelFormatError(err, 'TOKENIZER_INVALID', 'tokenizer.json'));
  });

  test('a malformed tokenizer_config.json gives TOKENIZER_INVALID naming it', async () => {
    const folder = await mkdtemp(join(dir, 'bad-config-'));
    await writeTokenizerFolder(folder, { 'tokenizer.json': JSON.stringify(demo.tokenizerJson), 'tokenizer_config.json': 'nope' });
    await assert.rejects(TextTokenizer.load(folder), (err) => assertModelFormatError(err, 'TOKENIZER_INVALID', 'tokenizer_config.json'));
  });
});

describe('buildDemoTokenizer', () => {
  test('is deterministic and honours numMerges', () => {
    assert.deepEqual(buildDemoTokenizer(), demo);
    const small = buildDemoTokenizer({ numMerges: 20 });
    assert.equal(small.vocabSize, 4 + 256 + 20);
    const model = (small.tokenizerJson as { model: { merges: [string, string][] } }).model;
    assert.equal(model.merges.length, 20);
    assert.deepEqual(model.merges.slice(0, 20), (demo.tokenizerJson as typeof small.tokenizerJson & { model: typeof model }).model.merges.slice(0, 20));
  });

  test('puts the special tokens first, then the 256 byte characters', () => {
    const vocab = (demo.tokenizerJson as { model: { vocab: Record<string, number> } }).model.vocab;
    assert.deepEqual([BOS_TOKEN, EOS_TOKEN, IM_START_TOKEN, IM_END_TOKEN].map((t) => vocab[t]), [0, 1, 2, 3]);
    assert.equal(vocab['!'], 4 + 0x21);
    assert.equal(vocab['Ġ'], 4 + 0x20); // GPT-2's stand-in for the space byte
    assert.deepEqual(demo.generationConfig, { bos_token_id: 0, eos_token_id: [1, 3] });
  });
});
