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

/** The llama.cpp peer's 75M benchmark model (../shared/peer gen_tiny.py: hidden 512, 8 layers, GPT-2 vocabulary). */
export const PEER_75M_SHAPE = Object.freeze({
  architectures: ['LlamaForCausalLM'],
  model_type: 'llama',
  hidden_size: 512,
  intermediate_size: 1408,
  num_hidden_layers: 8,
  num_attention_heads: 8,
  num_key_value_heads: 4,
  vocab_size: 50257,
  max_position_embeddings: 2048,
  rms_norm_eps: 1e-5,
  rope_theta: 10000,
  tie_word_embeddings: false,
  hidden_act: 'silu',
});
