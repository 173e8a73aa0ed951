// What each operation of the wire takes and answers (PROTOCOL.md), as schemas
// that protocol.js encodes and checks with, and when a client may send it
// again (RETRY). The same table as OPS in the Python client's protocol module.

// ------------------------------------------------------------------ schemas
//
// A schema is an array of [field, type, required]; a type is "str", "bin",
// "int", "float", "bool", ["array", type] or a nested schema (a map).

/** @typedef {"str" | "bin" | "int" | "float" | "bool" | ArrayType | Schema} Type */
/** @typedef {readonly ["array", any]} ArrayType an array of the type in [1] */
/** @typedef {ReadonlyArray<readonly [string, any, boolean]>} Schema [field, Type, required] */

const KEY = /** @type {const} */ (["key", "str", true]);

/** Arguments per op, in wire order. @type {Record<string, Schema>} */
export const ARGS = {
  create_key: [
    KEY,
    ["type", "str", true],
    ["auto_rotate_period", "float", false],
    ["verify_grace", "float", false],
    ["deletion_allowed", "bool", false],
    ["idempotency_key", "str", false],
    ["max_versions", "int", false],
    ["backup", "bool", false],
    ["watermark", "bool", false],
  ],
  list_keys: [],
  key_info: [KEY],
  public_key: [KEY, ["version", "int", false]],
  jwks: [["keys", ["array", "str"], true]],
  sign: [
    KEY,
    ["message", "bin", false],
    ["digest", "bin", false],
    ["hash", "str", false],
    ["padding", "str", false],
    ["format", "str", false],
    ["version", "int", false],
    ["position", "int", false],
  ],
  sign_batch: [
    KEY,
    ["messages", ["array", "bin"], false],
    ["digests", ["array", "bin"], false],
    ["hash", "str", false],
    ["padding", "str", false],
    ["format", "str", false],
    ["version", "int", false],
    ["position", "int", false],
  ],
  verify: [
    KEY,
    ["signature", "bin", true],
    ["message", "bin", false],
    ["digest", "bin", false],
    ["hash", "str", false],
    ["padding", "str", false],
    ["format", "str", false],
    ["version", "int", false],
    ["timestamp", "int", false],
    ["nonce", "bin", false],
  ],
  rotate: [KEY, ["idempotency_key", "str", false]],
  update_key: [
    KEY,
    ["auto_rotate_period", "float", false],
    ["verify_grace", "float", false],
    ["min_sign_version", "int", false],
    ["min_verify_version", "int", false],
    ["deletion_allowed", "bool", false],
    ["max_versions", "int", false],
    ["raise_mark", "int", false],
  ],
  disable: [KEY, ["version", "int", true]],
  enable: [KEY, ["version", "int", true]],
  destroy: [KEY, ["version", "int", false], ["all", "bool", false]],
  health: [],
  whoami: [],
  backup: [["keys", ["array", "str"], false]],
  restore: [
    KEY,
    ["header", "bin", true],
    ["header_mac", "bin", true],
    ["entry", "bin", true],
    ["entry_mac", "bin", true],
    ["check", "bool", false],
  ],
  import_params: [KEY],
  import_key: [
    KEY,
    ["type", "str", true],
    ["import_key_id", "str", true],
    ["wrapped_key", "bin", true],
    ["wrapped_material", "bin", true],
    ["public_key", "bin", false],
    ["new_version", "bool", false],
    ["auto_rotate_period", "float", false],
    ["verify_grace", "float", false],
    ["deletion_allowed", "bool", false],
    ["max_versions", "int", false],
    ["backup", "bool", false],
    ["idempotency_key", "str", false],
  ],
};

/** @type {Schema} */
const VERSION_INFO = [
  ["version", "int", true],
  ["state", "str", true],
  ["created", "float", true],
  // absent for an HMAC key: a secret has no public part
  ["public_key_pem", "str", false],
  ["verify_until", "float", false],
  ["eth_address", "str", false],
];

/** @type {Schema} */
const KEY_INFO = [
  ["name", "str", true],
  ["type", "str", true],
  ["created", "float", true],
  ["current_version", "int", true],
  ["versions", ["array", VERSION_INFO], true],
  ["auto_rotate_period", "float", false],
  ["verify_grace", "float", false],
  ["min_sign_version", "int", false],
  ["min_verify_version", "int", false],
  ["deletion_allowed", "bool", false],
  ["next_rotation", "float", false],
  ["created_version", "int", false],
  ["max_versions", "int", false],
  ["backup", "bool", false],
  ["watermark", "bool", false],
  ["mark", "int", false],
];

/** @type {Schema} */
const ERROR_INFO = [
  ["code", "int", true],
  ["name", "str", true],
  ["message", "str", true],
];

/** @type {Schema} */
const JWK = [
  ["kty", "str", true],
  ["kid", "str", true],
  ["use", "str", true],
  ["alg", "str", false],
  ["crv", "str", false],
  ["x", "str", false],
  ["y", "str", false],
  ["n", "str", false],
  ["e", "str", false],
];

/** Maps whose unknown members are kept (JWKs: a later daemon may add standard members). */
export const OPEN = new Set([JWK]);

/** Results per op. @type {Record<string, Schema>} */
/** A token's status in `health` (`token`, and each of `tokens`). */
const TOKEN_STATUS = [
  ["label", "str", true],
  ["manufacturer", "str", true],
  ["model", "str", true],
  ["serial", "str", true],
  ["logged_in", "bool", true],
  ["profile", "str", false],
  ["key_types", ["array", "str"], false],
  ["mechanisms", ["array", "str"], false],
  ["state", "str", false],
];

export const RESULTS = {
  create_key: KEY_INFO,
  list_keys: [
    [
      "keys",
      [
        "array",
        [
          ["name", "str", true],
          ["type", "str", true],
          ["created", "float", true],
          ["current_version", "int", true],
        ],
      ],
      true,
    ],
  ],
  key_info: KEY_INFO,
  public_key: [
    ["name", "str", true],
    ["version", "int", true],
    ["type", "str", true],
    ["public_key_pem", "str", true],
  ],
  jwks: [["keys", ["array", JWK], true]],
  sign: [
    ["signature", "bin", true],
    ["key", "str", true],
    ["version", "int", true],
    ["algorithm", "str", true],
  ],
  sign_batch: [
    ["key", "str", true],
    ["version", "int", true],
    ["algorithm", "str", true],
    [
      "results",
      [
        "array",
        [
          ["signature", "bin", false],
          ["error", ERROR_INFO, false],
        ],
      ],
      true,
    ],
  ],
  verify: [
    ["valid", "bool", true],
    ["key", "str", true],
    ["version", "int", false],
    ["algorithm", "str", false],
    ["status", "str", false],
  ],
  rotate: KEY_INFO,
  update_key: KEY_INFO,
  disable: KEY_INFO,
  enable: KEY_INFO,
  destroy: KEY_INFO,
  health: [
    ["status", "str", true],
    ["live", "bool", true],
    ["ready", "bool", true],
    ["daemon_version", "str", true],
    ["protocol_version", "int", true],
    ["uptime", "float", true],
    ["keys", "int", true],
    ["token", TOKEN_STATUS, false],
    ["detail", "str", false],
    [
      "audit",
      [
        ["chain", "str", true],
        ["seq", "int", true],
        ["hash", "str", true],
        ["file", "str", true],
        ["time", "float", true],
      ],
      false,
    ],
    ["tokens", ["array", TOKEN_STATUS], false],
  ],
  whoami: [
    ["uid", "int", true],
    ["gid", "int", true],
    ["groups", ["array", "int"], true],
    ["user", "str", false],
    [
      "keys",
      [
        "array",
        [
          ["name", "str", true],
          ["verbs", ["array", "str"], true],
        ],
      ],
      true,
    ],
  ],
  backup: [
    ["bundle", "bin", true],
    ["keys", ["array", "str"], true],
    ["versions", "int", true],
    ["skipped", ["array", "str"], true],
  ],
  restore: [
    KEY,
    ["outcome", "str", true],
    ["restored", ["array", "int"], true],
    ["present", ["array", "int"], true],
  ],
  import_params: [
    ["algorithm", "str", true],
    ["import_key_id", "str", true],
    ["public_key", "bin", true],
  ],
  import_key: KEY_INFO,
};

/** Every operation this client knows. */
export const OPS = Object.freeze(Object.keys(ARGS));

/**
 * When a client may send an op again after a broken connection or a retryable
 * answer: "safe" always, "with_key" only with an idempotency_key, "never" never.
 * The same table as OPS in the Python client's protocol module.
 */
export const RETRY = Object.freeze({
  create_key: "with_key",
  list_keys: "safe",
  key_info: "safe",
  public_key: "safe",
  jwks: "safe",
  sign: "safe",
  sign_batch: "safe",
  verify: "safe",
  rotate: "with_key",
  update_key: "safe",
  disable: "safe",
  enable: "safe",
  destroy: "safe",
  health: "safe",
  whoami: "safe",
  backup: "safe",
  restore: "safe",
  import_params: "safe",
  import_key: "with_key",
});

/** Operations a client may safely send again after a broken connection. */
export const IDEMPOTENT_OPS = Object.freeze(
  new Set(Object.keys(RETRY).filter((op) => RETRY[/** @type {keyof typeof RETRY} */ (op)] === "safe")),
);

/** Operations that take an idempotency_key; with one they are idempotent too. */
export const IDEMPOTENCY_KEY_OPS = Object.freeze(
  new Set(Object.keys(RETRY).filter((op) => RETRY[/** @type {keyof typeof RETRY} */ (op)] === "with_key")),
);
