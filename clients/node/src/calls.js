// One request builder per operation: what each Client method sends.

import { InvalidArgument } from "./errors.js";
import { checkArgs } from "./protocol.js";

const IDEMPOTENCY_KEY_RE = /^[\x21-\x7e]{1,128}$/;

/**
 * @typedef {object} Call
 * @property {string} op
 * @property {Record<string, unknown>} args in wire order, absent fields left out
 */

/**
 * restore's arguments: one key's entry from a bundle and the bundle's header,
 * each with its MAC (wire names, as every options object).
 * @typedef {object} RestoreArgs
 * @property {string} key the entry's key
 * @property {Uint8Array} header
 * @property {Uint8Array} header_mac
 * @property {Uint8Array} entry
 * @property {Uint8Array} entry_mac
 * @property {boolean} [check] true: only check the MACs and say what would be done
 */

/**
 * importKey's options: material wrapped under the token's import key (wire names).
 * @typedef {object} ImportKeyOptions
 * @property {string} import_key_id from importParams
 * @property {Uint8Array} wrapped_key an AES-256 key under RSA-OAEP (SHA-1) with the import key
 * @property {Uint8Array} wrapped_material the PKCS#8 DER (or secret) under it, AES-KWP
 * @property {Uint8Array} [public_key] SubjectPublicKeyInfo DER (EC, RSA)
 * @property {boolean} [new_version] true: the key's next version
 * @property {number} [auto_rotate_period]
 * @property {number} [verify_grace]
 * @property {boolean} [deletion_allowed]
 * @property {number} [max_versions]
 * @property {boolean} [backup]
 * @property {string} [idempotency_key]
 */

/**
 * @param {string} op
 * @param {string} name
 * @param {Record<string, unknown> | undefined} options
 * @returns {Call}
 */
function keyed(op, name, options = {}) {
  if (options === null || typeof options !== "object") {
    throw new InvalidArgument(`${op}: options must be an object`);
  }
  if ("key" in options) {
    throw new InvalidArgument(`${op}: give the key name as the first argument, not as 'key'`);
  }
  return { op, args: checkArgs(op, { key: name, ...options }) };
}

/** @param {unknown} key */
function checkIdempotencyKey(key) {
  if (key !== undefined && key !== null) {
    if (typeof key !== "string" || !IDEMPOTENCY_KEY_RE.test(key)) {
      throw new InvalidArgument(
        "field 'idempotency_key': use 1 to 128 printable ASCII characters (0x21-0x7e, no spaces)",
      );
    }
  }
}

/**
 * One builder per operation: what each sends. The Client's methods call these
 * with the same arguments.
 */
export const calls = Object.freeze({
  /**
   * @param {string} name
   * @param {string} type
   * @param {Record<string, unknown>} [options]
   */
  createKey(name, type, options = {}) {
    checkIdempotencyKey(options?.idempotency_key);
    if (options !== null && typeof options === "object" && "type" in options) {
      throw new InvalidArgument("create_key: give the key type as the second argument");
    }
    return keyed("create_key", name, { type, ...options });
  },
  listKeys() {
    return { op: "list_keys", args: {} };
  },
  /** @param {string} name */
  keyInfo(name) {
    return keyed("key_info", name);
  },
  /**
   * @param {string} name
   * @param {Record<string, unknown>} [options]
   */
  publicKey(name, options) {
    return keyed("public_key", name, options);
  },
  /** @param {string[]} names */
  jwks(names) {
    return { op: "jwks", args: checkArgs("jwks", { keys: names }) };
  },
  /**
   * @param {string} name
   * @param {Record<string, unknown>} options
   */
  sign(name, options) {
    return keyed("sign", name, options);
  },
  /**
   * @param {string} name
   * @param {Record<string, unknown>} options
   */
  signBatch(name, options) {
    return keyed("sign_batch", name, options);
  },
  /**
   * @param {string} name
   * @param {Record<string, unknown>} options
   */
  verify(name, options) {
    return keyed("verify", name, options);
  },
  /**
   * @param {string} name
   * @param {Record<string, unknown>} [options]
   */
  rotate(name, options) {
    checkIdempotencyKey(options?.idempotency_key);
    return keyed("rotate", name, options);
  },
  /**
   * @param {string} name
   * @param {Record<string, unknown>} settings
   */
  updateKey(name, settings) {
    return keyed("update_key", name, settings);
  },
  /**
   * @param {string} name
   * @param {number} version
   */
  disable(name, version) {
    return keyed("disable", name, { version });
  },
  /**
   * @param {string} name
   * @param {number} version
   */
  enable(name, version) {
    return keyed("enable", name, { version });
  },
  /**
   * @param {string} name
   * @param {{version?: number, all?: boolean}} options exactly one of version and all: true
   */
  destroy(name, options) {
    const version = options?.version ?? null;
    const all = options?.all ?? false;
    if ((version === null) === (all !== true)) {
      throw new InvalidArgument("destroy: give exactly one of version and all: true");
    }
    // `all` is sent only when true: "every version" is never a default.
    return keyed("destroy", name, { ...options, all: all === true ? true : undefined });
  },
  health() {
    return { op: "health", args: {} };
  },
  whoami() {
    return { op: "whoami", args: {} };
  },
  /**
   * @param {{keys?: string[]}} [options] keys: the keys to back up; absent: every backup-able key
   */
  backup(options = {}) {
    return { op: "backup", args: checkArgs("backup", options) };
  },
  /**
   * One key from a bundle: its entry and the bundle's header, each with its MAC.
   * @param {RestoreArgs} args
   */
  restore(args) {
    if (args === null || typeof args !== "object" || Array.isArray(args)) {
      throw new InvalidArgument("restore: arguments must be an object");
    }
    // `check` is sent only when true, as the Python client sends it: false is the default.
    const check = args.check === false ? undefined : args.check;
    return { op: "restore", args: checkArgs("restore", { ...args, check }) };
  },
  /**
   * The token's import key, to wrap material under for importKey (key: the key to import).
   * @param {string} name
   */
  importParams(name) {
    return { op: "import_params", args: checkArgs("import_params", { key: name }) };
  },
  /**
   * Existing key material, wrapped under the import key (PROTOCOL.md, import_params),
   * as a new key or (new_version: true) the next version of one.
   * @param {string} name
   * @param {string} type
   * @param {ImportKeyOptions} options
   */
  importKey(name, type, options) {
    if (options === null || typeof options !== "object" || Array.isArray(options)) {
      throw new InvalidArgument("importKey: options must be an object");
    }
    // `new_version` is sent only when true, as the Python client sends it.
    const newVersion = options.new_version === false ? undefined : options.new_version;
    return {
      op: "import_key",
      args: checkArgs("import_key", { ...options, key: name, type, new_version: newVersion }),
    };
  },
});

/** Method name (camelCase) per wire op. */
export const METHODS = Object.freeze({
  create_key: "createKey",
  list_keys: "listKeys",
  key_info: "keyInfo",
  public_key: "publicKey",
  jwks: "jwks",
  sign: "sign",
  sign_batch: "signBatch",
  verify: "verify",
  rotate: "rotate",
  update_key: "updateKey",
  disable: "disable",
  enable: "enable",
  destroy: "destroy",
  health: "health",
  whoami: "whoami",
  backup: "backup",
  restore: "restore",
  import_params: "importParams",
  import_key: "importKey",
});
