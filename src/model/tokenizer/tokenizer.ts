import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { Tokenizer } from '@huggingface/tokenizers';
import { ModelFormatError } from '../../errors.js';

/**
 * Text ↔ token ids for a Hugging Face model folder, on top of `@huggingface/tokenizers`
 * (a pure-JS reading of the Rust crate's tokenizer.json). This file adds what serving needs
 * and the library leaves open: the ids of BOS/EOS from the config files, the chat template,
 * a decode that is lossless and skips unknown ids the way the Rust crate does, and a
 * streaming decoder.
 */

const TOKENIZER_FILE = 'tokenizer.json';
const TOKENIZER_CONFIG_FILE = 'tokenizer_config.json';
const GENERATION_CONFIG_FILE = 'generation_config.json';

/**
 * The part of the library's Tokenizer this file uses. Its .d.ts files import each other
 * without extensions, which NodeNext cannot resolve, so the class arrives typed as `any`;
 * this interface puts the types back.
 */
interface LibTokenizer {
  encode(text: string, options: { add_special_tokens: boolean }): { ids: (number | undefined)[]; tokens: string[] };
  decode(ids: number[], options: { skip_special_tokens: boolean; clean_up_tokenization_spaces: boolean }): string;
  token_to_id(token: string): number | undefined;
  id_to_token(id: number): string | undefined;
  get_added_tokens_decoder(): Map<number, { content: string; special: boolean }>;
  get_vocab(withAddedTokens?: boolean): Map<string, number>;
}

type Json = Record<string, unknown>;

/** Where each config came from, so errors name the file the user has to fix. */
interface SourceFiles {
  tokenizer: string;
  tokenizerConfig: string;
  generationConfig: string;
}

export class TextTokenizer {
  readonly vocabSize: number;
  readonly bosTokenId: number | undefined;
  readonly eosTokenIds: number[];
  readonly chatTemplate: string | undefined;
  private readonly lib: LibTokenizer;
  private readonly specialIds: Set<number>;

  private constructor(tokenizerJson: unknown, tokenizerConfig: unknown, generationConfig: unknown, files: SourceFiles) {
    const tokJson = requireObject(tokenizerJson, files.tokenizer, 'the file is not a JSON object');
    if (!isObject(tokJson.model)) throw new ModelFormatError('TOKENIZER_INVALID', files.tokenizer, 'has no "model" object');
    const tokConfig = tokenizerConfig === undefined ? {} : requireObject(tokenizerConfig, files.tokenizerConfig, 'the file is not a JSON object');
    const genConfig = generationConfig === undefined ? {} : requireObject(generationConfig, files.generationConfig, 'the file is not a JSON object');

    try {
      // The library insists on every top-level key; the Rust crate treats them as optional.
      const complete = { normalizer: null, pre_tokenizer: null, post_processor: null, decoder: null, added_tokens: [], ...tokJson };
      this.lib = new Tokenizer(complete, tokConfig) as LibTokenizer;
    } catch (err) {
      throw new ModelFormatError('TOKENIZER_INVALID', files.tokenizer, `cannot build the tokenizer: ${(err as Error).message}`, { cause: err });
    }

    let maxId = -1;
    for (const id of this.lib.get_vocab(true).values()) maxId = Math.max(maxId, id);
    this.vocabSize = maxId + 1;

    this.specialIds = new Set();
    for (const [id, token] of this.lib.get_added_tokens_decoder()) if (token.special) this.specialIds.add(id);
    // transformers also treats additional_special_tokens as special when skipping them.
    const additional = Array.isArray(tokConfig.additional_special_tokens) ? tokConfig.additional_special_tokens : [];
    for (const token of additional) {
      const content = tokenContent(token);
      const id = content === undefined ? undefined : this.lib.token_to_id(content);
      if (id !== undefined) this.specialIds.add(id);
    }

    const configBos = this.configTokenId(tokConfig, 'bos_token', files.tokenizerConfig);
    const genBos = idList(genConfig.bos_token_id, 'bos_token_id', files.generationConfig);
    this.bosTokenId = configBos ?? genBos[0];

    const configEos = this.configTokenId(tokConfig, 'eos_token', files.tokenizerConfig);
    const genEos = idList(genConfig.eos_token_id, 'eos_token_id', files.generationConfig);
    this.eosTokenIds = [...new Set([...(configEos === undefined ? [] : [configEos]), ...genEos])];

    this.chatTemplate = chatTemplateOf(tokConfig.chat_template);
  }

  /** Reads tokenizer.json (required), tokenizer_config.json and generation_config.json (optional) from a Hugging Face model folder. */
  static async load(modelDir: string): Promise<TextTokenizer> {
    const files: SourceFiles = {
      tokenizer: join(modelDir, TOKENIZER_FILE),
      tokenizerConfig: join(modelDir, TOKENIZER_CONFIG_FILE),
      generationConfig: join(modelDir, GENERATION_CONFIG_FILE),
    };
    const tokenizerJson = await readJson(files.tokenizer, true);
    const tokenizerConfig = await readJson(files.tokenizerConfig, false);
    const generationConfig = await readJson(files.generationConfig, false);
    return new TextTokenizer(tokenizerJson, tokenizerConfig, generationConfig, files);
  }

  static fromJson(tokenizerJson: object, tokenizerConfig?: object, generationConfig?: object): TextTokenizer {
    return new TextTokenizer(tokenizerJson, tokenizerConfig, generationConfig, {
      tokenizer: TOKENIZER_FILE,
      tokenizerConfig: TOKENIZER_CONFIG_FILE,
      generationConfig: GENERATION_CONFIG_FILE,
    });
  }

  /**
   * Text → ids. With addSpecialTokens (the default) the tokenizer.json post_processor runs,
   * e.g. prepending BOS, as transformers and vLLM do for completion prompts. The post_processor
   * is the source of truth; tokenizer_config's add_bos_token is not consulted, as for
   * PreTrainedTokenizerFast. Special-token strings in the text become their single ids.
   */
  encode(text: string, opts: { addSpecialTokens?: boolean } = {}): number[] {
    const { ids, tokens } = this.lib.encode(text, { add_special_tokens: opts.addSpecialTokens ?? true });
    const missing = ids.findIndex((id) => id === undefined);
    if (missing >= 0) {
      throw new ModelFormatError('TOKENIZER_INVALID', TOKENIZER_FILE, `piece '${tokens[missing]}' is not in the vocab and there is no unk_token`);
    }
    return ids as number[];
  }

  /**
   * Ids → text. Ids outside the vocab are skipped (the Rust crate does the same), which
   * matters because models often pad their embedding past the tokenizer's vocab. The
   * library's clean_up_tokenization_spaces (" ." → ".") is never applied: it is lossy, vLLM
   * does not apply it to generated text, and streaming could not reproduce it.
   */
  decode(ids: number[], opts: { skipSpecialTokens?: boolean } = {}): string {
    const skip = opts.skipSpecialTokens ?? true;
    const kept = ids.filter((id) => this.lib.id_to_token(id) !== undefined && !(skip && this.specialIds.has(id)));
    // The library throws on an empty list rather than returning "".
    if (kept.length === 0) return '';
    return this.lib.decode(kept, { skip_special_tokens: false, clean_up_tokenization_spaces: false });
  }

  isSpecial(id: number): boolean {
    return this.specialIds.has(id);
  }

  createStreamDecoder(opts: { skipSpecialTokens?: boolean } = {}): StreamDecoder {
    const skipSpecialTokens = opts.skipSpecialTokens ?? true;
    return new StreamDecoder((ids) => this.decode(ids, { skipSpecialTokens }));
  }

  /** tokenizer_config's bos_token / eos_token (a string or an AddedToken {content}) → its id. */
  private configTokenId(config: Json, key: 'bos_token' | 'eos_token', file: string): number | undefined {
    const value = config[key];
    if (value === undefined || value === null) return undefined;
    const content = tokenContent(value);
    if (content === undefined) throw new ModelFormatError('TOKENIZER_INVALID', file, `${key} must be a string or {content}`);
    const id = this.lib.token_to_id(content);
    if (id === undefined) throw new ModelFormatError('TOKENIZER_INVALID', file, `${key} '${content}' is not in the tokenizer's vocab`);
    return id;
  }
}

/**
 * Incremental detokenizer for streaming, by vLLM's prefix_offset/read_offset method: text
 * is emitted only by decoding a window that starts a few tokens back (at prefixOffset) and
 * diffing it against the same window without the new tokens. Decoding from an earlier token
 * keeps tokenizer-wide rules right (Metaspace/SentencePiece drop the leading space of the
 * first token only; byte-level joins bytes across tokens), and withholding while the text
 * ends in U+FFFD keeps half a UTF-8 character from ever being emitted.
 * Invariant: the concatenation of every push() and flush() equals decode(all ids).
 */
export class StreamDecoder {
  private readonly ids: number[] = [];
  /** ids[prefixOffset, readOffset) is already emitted context; ids[readOffset..] is not emitted yet. */
  private prefixOffset = 0;
  private readOffset = 0;
  private finished = false;

  constructor(private readonly decodeIds: (ids: number[]) => string) {}

  /** Adds one token id; returns the text that became final (often "", never half a character). */
  push(id: number): string {
    if (this.finished) throw new Error('StreamDecoder.push() after flush()');
    this.ids.push(id);
    const prefixText = this.decodeIds(this.ids.slice(this.prefixOffset, this.readOffset));
    const newText = this.decodeIds(this.ids.slice(this.prefixOffset));
    // Nothing new (a skipped special token) or an incomplete character at the end: wait.
    if (newText.length <= prefixText.length || newText.endsWith('\uFFFD')) return '';
    this.prefixOffset = this.readOffset;
    this.readOffset = this.ids.length;
    return newText.slice(prefixText.length);
  }

  /**
   * Ends the stream and returns whatever was withheld, replacement characters included: at
   * the end an incomplete byte sequence is what decode() of all ids shows too.
   */
  flush(): string {
    if (this.finished) return '';
    this.finished = true;
    const prefixText = this.decodeIds(this.ids.slice(this.prefixOffset, this.readOffset));
    const newText = this.decodeIds(this.ids.slice(this.prefixOffset));
    return newText.length > prefixText.length ? newText.slice(prefixText.length) : '';
  }
}

async function readJson(file: string, required: boolean): Promise<unknown> {
  let text: string;
  try {
    text = await readFile(file, 'utf8');
  } catch (err) {
    if (!required && (err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw new ModelFormatError(required ? 'MODEL_FILE_MISSING' : 'TOKENIZER_INVALID', file, 'cannot read the file', { cause: err });
  }
  try {
    return JSON.parse(text);
  } catch (err) {
    throw new ModelFormatError('TOKENIZER_INVALID', file, `not valid JSON: ${(err as Error).message}`, { cause: err });
  }
}

function isObject(value: unknown): value is Json {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

function requireObject(value: unknown, file: string, message: string): Json {
  if (!isObject(value)) throw new ModelFormatError('TOKENIZER_INVALID', file, message);
  return value;
}

/** Special tokens in tokenizer_config are strings, or AddedToken objects in older files. */
function tokenContent(value: unknown): string | undefined {
  if (typeof value === 'string') return value;
  if (isObject(value) && typeof value.content === 'string') return value.content;
  return undefined;
}

/** generation_config's bos_token_id / eos_token_id: absent, null, one id or a list. */
function idList(value: unknown, key: string, file: string): number[] {
  if (value === undefined || value === null) return [];
  const list = Array.isArray(value) ? value : [value];
  for (const id of list) {
    if (!Number.isInteger(id) || (id as number) < 0) {
      throw new ModelFormatError('TOKENIZER_INVALID', file, `${key} must be a token id or a list of them, got ${JSON.stringify(value)}`);
    }
  }
  return list as number[];
}

/** chat_template is one string, or a list of {name, template} of which "default" is the chat one. */
function chatTemplateOf(value: unknown): string | undefined {
  if (typeof value === 'string') return value;
  if (Array.isArray(value)) {
    const entry = value.find((t) => isObject(t) && t.name === 'default');
    return isObject(entry) && typeof entry.template === 'string' ? entry.template : undefined;
  }
  return undefined;
}
