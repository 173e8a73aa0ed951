// JWS and JWT signed by a key on the token (RFC 7515, 7518, 7519, 8037), as
// the Python client's signd_client.jose does.
//
// signJwt(key, claims) gives a compact JWS whose protected header names the key
// and version as `kid` (`NAME:VERSION`, as in the JWK Set from Client.jwks), so
// a verifier that fetched the JWK Set picks the right public key, and tokens
// signed before a rotation keep verifying until their version retires:
//
//   const key = await signd.signingKey("api-tokens");
//   const token = await signJwt(key, { sub: "alice", exp: Math.floor(Date.now() / 1000) + 600 });
//   const jwks = await signd.jwks(["api-tokens"]); // publish this as JSON
//
// A handle made without a version follows rotation: when its version can no
// longer sign, signJws moves on to the key's current version (once per call)
// and remembers that, so later tokens cost one round trip again. A handle made
// with an explicit version never moves: signing after that version stopped
// being active rejects with VersionNotUsable.

import crypto from "node:crypto";

import { ProtocolViolation, VersionNotUsable } from "./errors.js";

const RSA = Object.freeze(["rsa-2048", "rsa-3072", "rsa-4096"]);

/**
 * @typedef {object} JwsAlgorithm
 * @property {readonly string[]} keyTypes signd key types that sign with it
 * @property {"sha256" | "sha384" | "sha512" | null} hash
 * @property {"pkcs1v15" | "pss" | null} padding
 * @property {"raw" | null} format
 */

/**
 * @param {readonly string[]} keyTypes
 * @param {JwsAlgorithm["hash"]} hash
 * @param {JwsAlgorithm["padding"]} padding
 * @param {JwsAlgorithm["format"]} format
 * @returns {Readonly<JwsAlgorithm>}
 */
function alg(keyTypes, hash, padding, format) {
  return Object.freeze({ keyTypes, hash, padding, format });
}

/**
 * JWS `alg` -> what signd signs with (RFC 7518 section 3.1, RFC 8037).
 * ES*: the raw r||s signature JWS wants; PS*: signd's PSS salt is the digest's
 * length, as RFC 7518 section 3.5 requires.
 * @type {Readonly<Record<string, Readonly<JwsAlgorithm>>>}
 */
export const JWS_ALGORITHMS = Object.freeze({
  ES256: alg(Object.freeze(["ec-p256"]), "sha256", null, "raw"),
  ES384: alg(Object.freeze(["ec-p384"]), "sha384", null, "raw"),
  // RFC 8812: ECDSA over secp256k1 with SHA-256 (signd's signatures are low-S).
  ES256K: alg(Object.freeze(["ec-secp256k1"]), "sha256", null, "raw"),
  EdDSA: alg(Object.freeze(["ed25519"]), null, null, null),
  RS256: alg(RSA, "sha256", "pkcs1v15", null),
  RS384: alg(RSA, "sha384", "pkcs1v15", null),
  RS512: alg(RSA, "sha512", "pkcs1v15", null),
  PS256: alg(RSA, "sha256", "pss", null),
  PS384: alg(RSA, "sha384", "pss", null),
  PS512: alg(RSA, "sha512", "pss", null),
});

/** @type {Readonly<Record<string, string>>} */
const DEFAULT_ALGORITHM = Object.freeze({
  "ec-p256": "ES256",
  "ec-p384": "ES384",
  "ec-secp256k1": "ES256K",
  ed25519: "EdDSA",
});

/**
 * Longer signing inputs are hashed here and sent as a digest (the same
 * signature), so a payload of any size fits in a request frame. Not for EdDSA,
 * which signs the message itself.
 */
const MESSAGE_LIMIT = 64 * 1024;

/**
 * The JWS `alg` a key of `keyType` signs with unless told otherwise: ES256,
 * ES384, ES256K (ec-secp256k1), EdDSA, or RS256 for RSA keys.
 * @param {string} keyType
 * @returns {string}
 */
export function defaultAlgorithm(keyType) {
  return Object.hasOwn(DEFAULT_ALGORITHM, keyType) ? DEFAULT_ALGORITHM[keyType] : "RS256";
}

/**
 * A programmer's error found before anything is sent: a TypeError with Node's
 * code for a bad argument value.
 * @param {string} message
 */
function badArgument(message) {
  const err = new TypeError(message);
  /** @type {TypeError & {code?: string}} */ (err).code = "ERR_INVALID_ARG_VALUE";
  return err;
}

/**
 * A key version on the token that signs JWS and JWTs; from Client.signingKey.
 * The private key stays on the token; `publicKey` is its public half.
 */
export class SigningKey {
  /**
   * @param {import("./client.js").Client} client
   * @param {{name: string, version: number, type: string, public_key_pem: string}} answer a public_key result
   * @param {boolean} pinned
   */
  constructor(client, answer, pinned) {
    /** The client that signs with this key. */
    this.client = client;
    /** The key's name in signd. */
    this.name = answer.name;
    /** The version this handle signs with. */
    this.version = Number(answer.version);
    /** The signd key type, e.g. `ec-p256`. */
    this.type = answer.type;
    /** True when the caller named the version; false when it was the key's current version then. */
    this.pinned = pinned;
    /** The version's public key. */
    this.publicKey = crypto.createPublicKey(answer.public_key_pem);
    Object.freeze(this);
  }

  /** `NAME:VERSION`, the `kid` of this version's JWK and of the JWS it signs. */
  get kid() {
    return `${this.name}:${this.version}`;
  }

  /**
   * A new handle, not pinned, for the key's current version.
   * @returns {Promise<SigningKey>}
   * @throws {KeyNotFound | ProtocolViolation} ProtocolViolation: the key changed its type
   */
  async latest() {
    const newer = await loadSigningKey(this.client, this.name);
    if (newer.type !== this.type) {
      throw new ProtocolViolation(
        `signd key '${this.name}' changed type from ${this.type} to ${newer.type}`,
      );
    }
    return newer;
  }
}

/**
 * A SigningKey for `name`, bound to `version` (by default the key's current
 * version at this call, and then not pinned). One public_key request.
 * @param {import("./client.js").Client} client
 * @param {string} name
 * @param {{version?: number | null}} [options]
 * @returns {Promise<SigningKey>}
 */
export async function loadSigningKey(client, name, options = {}) {
  const version = options?.version ?? undefined;
  const answer = await client.publicKey(name, version === undefined ? {} : { version });
  return new SigningKey(client, answer, version !== undefined);
}

/**
 * Handles made without a version -> the handle that replaced them after a
 * rotation (weak: it goes when the caller drops the original).
 * @type {WeakMap<SigningKey, SigningKey>}
 */
const successors = new WeakMap();
/**
 * Handles whose successor is being fetched: concurrent calls that all hit
 * VersionNotUsable share one public_key request.
 * @type {WeakMap<SigningKey, {from: SigningKey, next: Promise<SigningKey>}>}
 */
const following = new WeakMap();

/** @param {Uint8Array} data */
function b64url(data) {
  return Buffer.from(data.buffer, data.byteOffset, data.byteLength).toString("base64url");
}

/**
 * @param {unknown} value
 * @returns {value is Record<string, unknown>}
 */
function isObject(value) {
  return value !== null && typeof value === "object" && !Array.isArray(value) && !ArrayBuffer.isView(value);
}

/**
 * @param {unknown} value
 * @param {string} what
 * @returns {Buffer}
 */
function compactJson(value, what) {
  if (!isObject(value)) throw badArgument(`${what} must be a JSON object (a plain object)`);
  let text;
  try {
    text = JSON.stringify(value);
  } catch (exc) {
    throw badArgument(`JWT claims and headers must be JSON values: ${/** @type {Error} */ (exc).message}`);
  }
  return Buffer.from(text, "utf8");
}

/**
 * The protected header and how to sign; throws a TypeError for a mismatch.
 * @param {SigningKey} signer
 * @param {Record<string, unknown> | undefined} headers
 * @param {string | undefined} algorithm
 * @returns {{header: Record<string, unknown>, spec: Readonly<JwsAlgorithm>}}
 */
function plan(signer, headers, algorithm) {
  const algName = algorithm ?? defaultAlgorithm(signer.type);
  const spec = typeof algName === "string" && Object.hasOwn(JWS_ALGORITHMS, algName) ? JWS_ALGORITHMS[algName] : undefined;
  if (spec === undefined) {
    throw badArgument(
      `unsupported JWS algorithm ${JSON.stringify(algName)}; supported: ${Object.keys(JWS_ALGORITHMS).join(", ")}`,
    );
  }
  if (!spec.keyTypes.includes(signer.type)) {
    throw badArgument(
      `JWS algorithm ${algName} needs a ${spec.keyTypes.join(" or ")} key; ` +
        `key '${signer.name}' is ${signer.type}`,
    );
  }
  /** @type {Record<string, unknown>} */
  const header = { alg: algName, kid: signer.kid };
  for (const [field, value] of Object.entries(headers ?? {})) {
    if ((field === "alg" || field === "kid") && value !== header[field]) {
      throw badArgument(
        `header '${field}' is set by the key: ${JSON.stringify(header[field])}, not ${JSON.stringify(value)}`,
      );
    }
    header[field] = value;
  }
  return { header, spec };
}

/**
 * The JWS signing input and the sign options for it.
 * @param {SigningKey} signer
 * @param {Buffer} payload
 * @param {Record<string, unknown> | undefined} headers
 * @param {string | undefined} algorithm
 */
function request(signer, payload, headers, algorithm) {
  const { header, spec } = plan(signer, headers, algorithm);
  const input = `${b64url(compactJson(header, "the JWS header"))}.${b64url(payload)}`;
  const data = Buffer.from(input, "ascii");
  /** @type {Record<string, unknown>} */
  const options = {
    hash: spec.hash ?? undefined,
    padding: spec.padding ?? undefined,
    format: spec.format ?? undefined,
    version: signer.version,
  };
  if (spec.hash !== null && data.length > MESSAGE_LIMIT) {
    options.digest = crypto.createHash(spec.hash).update(data).digest();
  } else {
    options.message = data;
  }
  return { input, options };
}

/**
 * `key`, or the handle that replaced it after a rotation.
 * @param {SigningKey} key
 */
function current(key) {
  return successors.get(key) ?? key;
}

/**
 * The handle `key` moves on to after `failed` could not sign: another call's
 * if one already moved on past `failed`, else the key's current version.
 * @param {SigningKey} key
 * @param {SigningKey} failed
 * @returns {Promise<SigningKey>}
 */
function moveOn(key, failed) {
  const newer = successors.get(key);
  if (newer !== undefined && newer !== failed) return Promise.resolve(newer);
  const inFlight = following.get(key);
  if (inFlight !== undefined && inFlight.from === failed) return inFlight.next;
  const next = failed.latest().then(
    (found) => {
      if (following.get(key)?.next === next) following.delete(key);
      successors.set(key, found);
      return found;
    },
    (err) => {
      if (following.get(key)?.next === next) following.delete(key);
      throw err;
    },
  );
  following.set(key, { from: failed, next });
  return next;
}

/**
 * @param {unknown} key
 * @returns {asserts key is SigningKey}
 */
function checkKey(key) {
  if (!(key instanceof SigningKey)) {
    throw badArgument("key must be a SigningKey (from client.signingKey(name))");
  }
}

/**
 * @param {unknown} payload
 * @returns {Buffer}
 */
function payloadBytes(payload) {
  if (typeof payload === "string") return Buffer.from(payload, "utf8");
  if (payload instanceof Uint8Array) return Buffer.from(payload.buffer, payload.byteOffset, payload.byteLength);
  throw badArgument("the JWS payload must be a Uint8Array (or Buffer) or a string");
}

/**
 * A compact JWS of `payload` (`header.payload.signature`).
 *
 * `headers` are added to the protected header; `alg` and `kid` come from the
 * key (giving them is allowed only with the same value).
 *
 * @param {SigningKey} key
 * @param {Uint8Array | string} payload bytes, or a string (as UTF-8)
 * @param {{headers?: Record<string, unknown>, algorithm?: string}} [options]
 * @returns {Promise<string>}
 * @throws {TypeError} (ERR_INVALID_ARG_VALUE) `algorithm` does not fit the key type or is
 *   unknown, or a header sets `alg`/`kid`: nothing was sent
 * @throws {VersionNotUsable} a key pinned to a version that may no longer sign
 */
export async function signJws(key, payload, options = {}) {
  checkKey(key);
  const data = payloadBytes(payload);
  const { headers, algorithm } = options ?? {};
  if (headers !== undefined && headers !== null && !isObject(headers)) {
    throw badArgument("headers must be a plain object");
  }
  let signer = current(key);
  let followed = false;
  for (;;) {
    const { input, options: signOptions } = request(signer, data, headers ?? undefined, algorithm ?? undefined);
    let res;
    try {
      res = await signer.client.sign(signer.name, signOptions);
    } catch (exc) {
      // Only a handle made without a version moves, and once per call: if the
      // newest version cannot sign either (disabled, say), the caller hears why.
      if (!(exc instanceof VersionNotUsable) || key.pinned || followed) throw exc;
      signer = await moveOn(key, signer);
      followed = true;
      continue;
    }
    if (Number(res.version) !== signer.version) {
      throw new ProtocolViolation(
        `asked signd to sign with '${signer.name}' version ${signer.version}, ` +
          `it signed with version ${res.version}`,
      );
    }
    return `${input}.${b64url(res.signature)}`;
  }
}

/**
 * A JWT: `claims` as a compact JWS with `typ: "JWT"` (see signJws).
 *
 * The claims are written as given; add `iat`/`exp`/`nbf` (integers, in
 * seconds) yourself, as your verifier expects.
 *
 * @param {SigningKey} key
 * @param {Record<string, unknown>} claims
 * @param {{headers?: Record<string, unknown>, algorithm?: string}} [options]
 * @returns {Promise<string>}
 */
export async function signJwt(key, claims, options = {}) {
  checkKey(key);
  const payload = compactJson(claims, "JWT claims");
  const { headers, algorithm } = options ?? {};
  if (headers !== undefined && headers !== null && !isObject(headers)) {
    throw badArgument("headers must be a plain object");
  }
  return signJws(key, payload, { headers: { typ: "JWT", ...(headers ?? {}) }, algorithm });
}
