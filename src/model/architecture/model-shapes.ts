/**
 * config.json of well-known model shapes, for benchmarks and sizing with random weights
 * (nothing is downloaded). Values as published in the models' own config.json.
 */
export const SMOLLM2_135M_SHAPE = Object.freeze({
  architectures: ['LlamaForCausalLM'],
  model_type: 'llama',
  hidden_size: 576,
  intermediate_size: 1536,
  num_hidden_layers: 30,
  num_attention_heads: 9,
  num_key_value_heads: 3,
  vocab_size: 49152,
  max_position_embeddings: 8192,
  rms_norm_eps: 1e-5,
  rope_theta: 100000,
  tie_word_embeddings: true,
  hidden_act: 'silu',
});
