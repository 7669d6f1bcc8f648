/**
 * `lora-gateway <command> --help`: each command's own options, one line each (the overview of
 * all commands is main.ts's USAGE).
 */
const ENGINE = `
Engine options (also LORA_GATEWAY_BACKEND, LORA_GATEWAY_MAX_LORA_RANK, LORA_GATEWAY_LORA_STRATEGY):
  --backend auto|tensorflow|wasm|cpu   tensor backend (auto: tfjs-node-gpu, tfjs-node, then wasm)
  --max-lora-rank N                    largest adapter rank accepted (default 64)
  --lora-strategy auto|stacked|segmented   how the batched LoRA op runs (default auto)
`;

export const COMMAND_HELP: Record<string, string> = {
  serve: `lora-gateway serve — many LoRA adapters of one model over an OpenAI-compatible HTTP API

Usage: lora-gateway serve [options]

  --model DIR                    Hugging Face model folder (default: the demo model, made once in DATA/demo-model)
  --adapter-dir DIR              register every sub-folder as an adapter at startup (id = folder name)
  --host H                       listen address (default 127.0.0.1; LORA_GATEWAY_HOST)
  --port P                       listen port (default 8000; LORA_GATEWAY_PORT; 0 = any free port)
  --served-model-name NAME       the base model's id in "model" (default: the model folder's name)
  --data DIR                     data folder: adapter store and demo model (default ./data; LORA_GATEWAY_DATA_DIR)
  --device-memory SIZE           page pool for KV cache and adapters (default 256MiB; LORA_GATEWAY_DEVICE_MEMORY)
  --host-memory SIZE             host cache of adapters read from disk (default 1GiB; LORA_GATEWAY_HOST_MEMORY)
  --max-running-seqs N           sequences decoding at once (default 64)
  --max-batch-tokens N           prompt tokens prefilled per step (default 2048)
  --max-adapters-per-batch N     distinct adapters in one step (default 64)
  --max-waiting N                queued requests before HTTP 429 (default 256)
  --body-limit SIZE              largest request body or uploaded file (default 256MiB; LORA_GATEWAY_BODY_LIMIT)
  --engine-thread on|off         run the engine on its own worker thread (default on; LORA_GATEWAY_ENGINE_THREAD)
  --redis URL                    Redis for federated training jobs (default off; LORA_GATEWAY_REDIS_URL)
  --federation-prefix P          prefix of every federation key and queue (default lora-gateway)
  --federation-keep-updates on|off   keep accepted updates for the audit route (default on)
  --log-level LEVEL              fatal|error|warn|info|debug|trace|silent (default info; LORA_GATEWAY_LOG_LEVEL);
                                 JSON lines on stdout when it is not a terminal, one line per request
  --keep-versions N              versions of each adapter kept on disk, older ones removed once unused
                                 (default: keep all; LORA_GATEWAY_KEEP_VERSIONS)
  --api-keys FILE                keys file from \`lora-gateway api-key create\`: Bearer keys, tenants, roles
                                 (default: none, the server runs open; LORA_GATEWAY_API_KEYS; re-read on SIGHUP)
  --metrics-public               serve /metrics without a key (default: an admin key is needed when keys are on)
  --allow-unauthenticated        listen on a non-loopback --host without --api-keys (refused otherwise)
  --lora-path-root DIR           folders POST /v1/load_lora_adapter may read (default: off; LORA_GATEWAY_LORA_PATH_ROOT)
  --header-timeout DURATION      time a connection has to send its request headers (default 10s; 0 = none)
  --request-timeout DURATION     time to receive a whole request, body included; responses are not limited (default 300s)
  --keep-alive-timeout DURATION  an idle keep-alive connection is closed after this (default 72s)
  --shutdown-grace DURATION      on SIGTERM / SIGINT, running requests get this long before they are cancelled (default 30s)
${ENGINE}`,
  'api-key': `lora-gateway api-key — make, revoke and list the keys of serve --api-keys

Usage: lora-gateway api-key create --api-keys FILE --tenant T [--role admin|tenant] [--json]
       lora-gateway api-key revoke --api-keys FILE (--id KEY_ID | --key KEY | --tenant T) [--json]
       lora-gateway api-key list --api-keys FILE [--json]

  --api-keys FILE    the keys file (created by the first create; only SHA-256 hashes are stored)
  --tenant T         the key's tenant: 1–64 letters, digits, "_" or "-" (revoke: every key of T)
  --role ROLE        admin (sees and manages everything) or tenant (its own adapters and jobs; default)
  --id KEY_ID        revoke the key with this id (key_…, as list and create --json show it)
  --key KEY          revoke this key
  --json             create: one line {"key", "tenant", "role", "id"}; list: one JSON line per key
A running server reads the file again on SIGHUP (kill -HUP PID).
`,
  'fed-client-acl': `lora-gateway fed-client-acl — a Redis ACL user that confines one fed-client to its own keys

Usage: lora-gateway fed-client-acl --client-id ID [--federation-prefix P] [--json]

  --client-id ID           the client's id; a tenant's clients are named TENANT.NAME
  --federation-prefix P    the server's --federation-prefix (default lora-gateway)
  --json                   one line {"user", "password", "rules", "command"}
Prints an ACL SETUSER line with a fresh password: run it as a Redis admin, then start the client
with --redis redis://USER:PASSWORD@HOST:PORT.
`,
  generate: `lora-gateway generate — one prompt, or a JSONL batch in one heterogeneous batch

Usage: lora-gateway generate --model DIR [options] (--prompt TEXT | --prompt-ids 1,2,3 | --batch FILE.jsonl)

  --model DIR          Hugging Face model folder
  --adapter DIR        a PEFT adapter folder (default: the base model)
  --prompt TEXT        prompt text (tokenized with the model's tokenizer, BOS added)
  --prompt-ids LIST    prompt token ids, comma-separated
  --batch FILE         one JSON request per line; one JSON result line out per line in, same order
  --max-tokens N       tokens to generate (default 16)
  --temperature T      0 = greedy (default 0)
  --top-p P            nucleus sampling (default 1)
  --top-k K            top-k sampling (default -1 = off)
  --seed S             sampling seed
  --logprobs N         top-N logprobs per generated token (0–20)
  --echo               also score the prompt's tokens
  --ignore-eos         keep generating past end-of-sequence
  --json               print the result as one JSON line (default: the text, streamed)
${ENGINE}`,
  'demo-model': `lora-gateway demo-model — a tiny Llama in the Hugging Face layout with PEFT adapters of mixed ranks

Usage: lora-gateway demo-model --out DIR [options]

  --out DIR                 model folder to write; DIR/adapters holds exactly the adapters written
  --adapters N              PEFT adapters to write (default 4)
  --dtype F32|F16|BF16      weight dtype (default F32)
`,
  demo: `lora-gateway demo — one heterogeneous batch over the demo model's adapters

Usage: lora-gateway demo [--data DIR]

  --data DIR     data folder, as for serve: the demo model is DIR/demo-model, made once (default ./data)
${ENGINE}`,
  'fed-client': `lora-gateway fed-client — one federation client: trains on its own text, uploads only LoRA updates

Usage: lora-gateway fed-client --redis URL --client-id ID --data PATH --model DIR [options]

  --redis URL              the gateway's Redis (LORA_GATEWAY_REDIS_URL)
  --client-id ID           this client's id: 1–64 letters, digits, ".", "_" or "-"
  --data PATH              its text: a .txt file, a .jsonl file with a "text" field, or a folder of them
  --model DIR              the same model folder as the gateway's (checked by fingerprint)
  --federation-prefix P    as the gateway's --federation-prefix (default lora-gateway)
  --poison scale:K         test mode: upload the update's change ×K (robust-aggregation tests only)
${ENGINE}`,
};
