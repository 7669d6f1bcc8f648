import { Template } from '@huggingface/jinja';
import { RequestError } from '../errors.js';
import type { TextTokenizer } from '../model/tokenizer/tokenizer.js';

export interface ChatMessage {
  role: string;
  content: string;
}

/**
 * Messages as the template takes them: `content` a string, or OpenAI's list of content parts of
 * which only text parts are supported; their texts are joined with newlines, as vLLM does.
 */
export function chatMessagesOf(messages: { role: string; content: unknown }[]): ChatMessage[] {
  return messages.map((m, i) => {
    if (typeof m.content === 'string') return { role: m.role, content: m.content };
    if (!Array.isArray(m.content)) throw new RequestError('REQUEST_INVALID', `messages[${i}].content must be a string or a list of content parts`);
    const texts = m.content.map((part: unknown, j) => {
      const p = part as { type?: unknown; text?: unknown } | null;
      if (p?.type !== 'text') throw new RequestError('UNSUPPORTED_PARAMETER', `messages[${i}].content[${j}].type: only "text" parts are supported, got ${JSON.stringify(p?.type ?? null)}`);
      if (typeof p.text !== 'string') throw new RequestError('REQUEST_INVALID', `messages[${i}].content[${j}].text must be a string`);
      return p.text;
    });
    return { role: m.role, content: texts.join('\n') };
  });
}

/** Parsed templates by source; a gateway serves one model, so this holds one entry. */
const parsed = new Map<string, Template>();

/**
 * Renders the conversation with the model's own chat_template (tokenizer_config.json), the
 * way transformers' apply_chat_template(add_generation_prompt=True) does: the template sees
 * `messages`, `bos_token` and `eos_token`, and @huggingface/jinja provides `raise_exception`. The result already
 * holds any BOS the template writes, so it is encoded without adding special tokens.
 */
export function renderChatPrompt(tokenizer: TextTokenizer | undefined, messages: ChatMessage[]): string {
  const source = tokenizer?.chatTemplate;
  if (!tokenizer || source === undefined) {
    throw new RequestError('REQUEST_INVALID', 'this model has no chat template (chat_template in tokenizer_config.json); use /v1/completions');
  }
  try {
    let template = parsed.get(source);
    if (!template) {
      template = new Template(source);
      parsed.set(source, template);
    }
    return template.render({
      messages,
      add_generation_prompt: true,
      bos_token: specialText(tokenizer, tokenizer.bosTokenId),
      eos_token: specialText(tokenizer, tokenizer.eosTokenIds[0]),
    });
  } catch (err) {
    // the library's own raise_exception lands here too, e.g. "roles must alternate"
    throw new RequestError('REQUEST_INVALID', `cannot render the chat template: ${(err as Error).message}`, { cause: err });
  }
}

function specialText(tokenizer: TextTokenizer, id: number | undefined): string {
  return id === undefined ? '' : tokenizer.decode([id], { skipSpecialTokens: false });
}
