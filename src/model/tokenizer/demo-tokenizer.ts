/**
 * A small but real Hugging Face tokenizer for the demo model and the tests: byte-level BPE
 * in the tokenizer.json layout the Rust `tokenizers` crate writes (as SmolLM2 and Llama-3
 * ship it), with merges trained here over an embedded corpus, so nothing is downloaded and
 * every tokenizer code path (merges, multi-byte characters, special tokens, BOS
 * post-processing) is exercised by files any Hugging Face loader would accept.
 */

export const BOS_TOKEN = '<|begin_of_text|>';
export const EOS_TOKEN = '<|end_of_text|>';
export const IM_START_TOKEN = '<|im_start|>';
export const IM_END_TOKEN = '<|im_end|>';

/** Special tokens take the first ids, in this order, as in SmolLM2's vocab. */
const SPECIAL_TOKENS = [BOS_TOKEN, EOS_TOKEN, IM_START_TOKEN, IM_END_TOKEN];

/** SmolLM2's ChatML template. */
const CHAT_TEMPLATE =
  "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}" +
  "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/** The demo model's max_position_embeddings. */
const MODEL_MAX_LENGTH = 2048;

/**
 * The GPT-2 pre-tokenizer split (what ByteLevel with use_regex=true applies), so merges are
 * learned over the same pieces the tokenizer will see at encode time.
 */
const GPT2_SPLIT = /'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+/gu;

const CORPUS = `The gateway serves one base model and many small adapters. Each adapter changes only a
few matrices, so the server can keep thousands of them on the host and move the ones that
are needed onto the device. When a request arrives, the scheduler looks at the adapter it
names, and the pager makes sure that adapter is resident before the batch runs.

A good tokenizer turns text into numbers and back again without losing anything. The words
that appear most often become single tokens, while rare words are split into smaller pieces.
This is the idea behind byte pair encoding: start from the bytes, then merge the pair that is
seen most often, and repeat until the vocabulary is large enough.

In the morning we walked to the café on the corner, where the coffee is strong and the bread
is fresh. It would be naïve to think that every language fits in one byte per character:
日本 is written with characters that need three bytes each, and even a word like café needs
two bytes for its last letter. The model does not care; it only sees the numbers.

Training with federated learning means that the data stays where it was made. Each client
trains its own adapter for a few steps, sends back only the small update, and the server
averages the updates into the next version of the adapter. Then the new version is published
and the clients start again from there.`;

export interface DemoTokenizer {
  tokenizerJson: object;
  tokenizerConfig: object;
  generationConfig: object;
  /** Model vocab + added tokens (max id + 1); the demo model's vocab_size. */
  vocabSize: number;
}

export function buildDemoTokenizer(opts: { numMerges?: number } = {}): DemoTokenizer {
  const byteChars = bytesToUnicode();
  const vocab: Record<string, number> = {};
  for (const token of SPECIAL_TOKENS) vocab[token] = Object.keys(vocab).length;
  for (const ch of byteChars) vocab[ch] = Object.keys(vocab).length;
  const merges = trainMerges(CORPUS, byteChars, opts.numMerges ?? 200);
  for (const [a, b] of merges) {
    // Two different pairs can spell the same token ("a"+"bc", "ab"+"c"); it keeps one id.
    if (!(a + b in vocab)) vocab[a + b] = Object.keys(vocab).length;
  }
  const vocabSize = Object.keys(vocab).length;
  const bosId = vocab[BOS_TOKEN];

  const tokenizerJson = {
    version: '1.0',
    truncation: null,
    padding: null,
    added_tokens: SPECIAL_TOKENS.map((content) => ({
      id: vocab[content],
      content,
      single_word: false,
      lstrip: false,
      rstrip: false,
      normalized: false,
      special: true,
    })),
    normalizer: null,
    pre_tokenizer: { type: 'ByteLevel', add_prefix_space: false, trim_offsets: true, use_regex: true },
    post_processor: {
      type: 'TemplateProcessing',
      single: [{ SpecialToken: { id: BOS_TOKEN, type_id: 0 } }, { Sequence: { id: 'A', type_id: 0 } }],
      pair: [
        { SpecialToken: { id: BOS_TOKEN, type_id: 0 } },
        { Sequence: { id: 'A', type_id: 0 } },
        { SpecialToken: { id: BOS_TOKEN, type_id: 1 } },
        { Sequence: { id: 'B', type_id: 1 } },
      ],
      special_tokens: { [BOS_TOKEN]: { id: BOS_TOKEN, ids: [bosId], tokens: [BOS_TOKEN] } },
    },
    decoder: { type: 'ByteLevel', add_prefix_space: true, trim_offsets: true, use_regex: true },
    model: {
      type: 'BPE',
      dropout: null,
      unk_token: null,
      continuing_subword_prefix: null,
      end_of_word_suffix: null,
      fuse_unk: false,
      byte_fallback: false,
      ignore_merges: false,
      vocab,
      merges,
    },
  };

  const tokenizerConfig = {
    add_bos_token: true,
    add_prefix_space: false,
    added_tokens_decoder: Object.fromEntries(
      SPECIAL_TOKENS.map((content) => [
        String(vocab[content]),
        { content, lstrip: false, normalized: false, rstrip: false, single_word: false, special: true },
      ]),
    ),
    additional_special_tokens: [IM_START_TOKEN, IM_END_TOKEN],
    bos_token: BOS_TOKEN,
    chat_template: CHAT_TEMPLATE,
    // Cleanup rewrites " ." to "." and so on, which makes decode lossy; SmolLM2 turns it off too.
    clean_up_tokenization_spaces: false,
    eos_token: EOS_TOKEN,
    model_max_length: MODEL_MAX_LENGTH,
    tokenizer_class: 'PreTrainedTokenizerFast',
  };

  const generationConfig = {
    bos_token_id: bosId,
    eos_token_id: [vocab[EOS_TOKEN], vocab[IM_END_TOKEN]],
  };

  return { tokenizerJson, tokenizerConfig, generationConfig, vocabSize };
}

/**
 * GPT-2's reversible byte → printable character table: printable Latin-1 bytes map to
 * themselves, the other 68 to U+0100 onward, so every token is a visible string.
 * Returned in byte order: result[b] is the character for byte b.
 */
function bytesToUnicode(): string[] {
  const printable = (b: number) => (b >= 0x21 && b <= 0x7e) || (b >= 0xa1 && b <= 0xac) || (b >= 0xae && b <= 0xff);
  const chars: string[] = [];
  let next = 256;
  for (let b = 0; b < 256; b++) chars.push(String.fromCodePoint(printable(b) ? b : next++));
  return chars;
}

/**
 * Standard BPE training: each round merges the adjacent pair with the highest count over
 * all words (weighted by word frequency); ties go to the pair that sorts first by code
 * units, so the result never depends on Map iteration order.
 */
function trainMerges(corpus: string, byteChars: string[], numMerges: number): [string, string][] {
  const encoder = new TextEncoder();
  const wordFreq = new Map<string, number>();
  for (const piece of corpus.match(GPT2_SPLIT) ?? []) {
    const word = Array.from(encoder.encode(piece), (b) => byteChars[b]).join('');
    wordFreq.set(word, (wordFreq.get(word) ?? 0) + 1);
  }
  // Each word as its current list of symbols; [symbols, frequency].
  const words: [string[], number][] = [...wordFreq].map(([w, f]) => [Array.from(w), f]);

  const merges: [string, string][] = [];
  while (merges.length < numMerges) {
    const counts = new Map<string, { pair: [string, string]; count: number }>();
    for (const [symbols, freq] of words) {
      for (let i = 0; i + 1 < symbols.length; i++) {
        const key = `${symbols[i]}\u0000${symbols[i + 1]}`;
        const entry = counts.get(key);
        if (entry) entry.count += freq;
        else counts.set(key, { pair: [symbols[i], symbols[i + 1]], count: freq });
      }
    }
    let best: { key: string; pair: [string, string]; count: number } | undefined;
    for (const [key, { pair, count }] of counts) {
      if (!best || count > best.count || (count === best.count && key < best.key)) best = { key, pair, count };
    }
    if (!best) break; // every word is a single symbol: nothing left to merge
    const [a, b] = best.pair;
    merges.push([a, b]);
    for (const entry of words) {
      const symbols = entry[0];
      const merged: string[] = [];
      for (let i = 0; i < symbols.length; i++) {
        if (i + 1 < symbols.length && symbols[i] === a && symbols[i + 1] === b) {
          merged.push(a + b);
          i++;
        } else {
          merged.push(symbols[i]);
        }
      }
      entry[0] = merged;
    }
  }
  return merges;
}
