// The signd wire protocol, version 1 (PROTOCOL.md): framing, msgpack rules,
// the envelope. The schemas and retry classes are in schema.js, the request
// builders in calls.js.
//
// Requests are encoded field by field from a schema, so that
//   - map keys come in the documented order (the golden frames' order),
//   - absent (undefined or null) optional fields are left out,
//   - a `float` field is always a msgpack float 64, even when its value is
//     integral (JavaScript has one number type; msgpack libraries would
//     otherwise write 7776000 as an int),
//   - an `int` field is always a msgpack int in its shortest form,
//   - `bin` fields (Uint8Array/Buffer) are msgpack bin, `str` fields msgpack str.
// The msgpack values themselves are written by @msgpack/msgpack; only the map
// and array headers around them are written here.

import { Decoder, Encoder } from "@msgpack/msgpack";

import { InvalidArgument, ProtocolViolation, errorFromWire } from "./errors.js";
import { ARGS, OPEN, RESULTS } from "./schema.js";

export const PROTOCOL_VERSION = 1;
/** The daemon's default limit for a request body ([limits] max_frame). */
export const DEFAULT_MAX_FRAME = 1 << 20;
/** The largest response body this client accepts (a full RSA-4096 sign_batch is ~5.3 MB). */
export const MAX_RESPONSE_FRAME = 64 << 20;
/** Request ids are unsigned 64-bit ints. */
export const MAX_REQUEST_ID = (1n << 64n) - 1n;
/** Most items one sign_batch may carry. */
export const MAX_BATCH = 10000;
/** Most key names one jwks request may name. */
export const MAX_JWKS_KEYS = 100;
export const KEY_TYPES = Object.freeze([
  "ec-p256",
  "ec-p384",
  "ed25519",
  "rsa-2048",
  "rsa-3072",
  "rsa-4096",
  "ec-secp256k1",
  "hmac-sha256",
  "hmac-sha384",
  "hmac-sha512",
]);

// ----------------------------------------------------------------- encoding

const plain = new Encoder();
const asFloat = new Encoder({ forceIntegerToFloat: true });
const wide = new Encoder({ useBigInt64: true });

/**
 * @param {unknown} value
 * @returns {string}
 */
function typeName(value) {
  if (value === null || value === undefined) return "nil";
  if (value instanceof Uint8Array) return "bin";
  if (Array.isArray(value)) return "array";
  if (typeof value === "number") return Number.isInteger(value) ? "int" : "float";
  if (typeof value === "bigint") return "int";
  if (typeof value === "string") return "str";
  if (typeof value === "boolean") return "bool";
  return "map";
}

/**
 * @param {number} n
 * @param {number} fix
 * @param {number} b16
 * @returns {Uint8Array}
 */
function containerHeader(n, fix, b16) {
  if (n < 16) return Uint8Array.of(fix | n);
  if (n < 0x10000) return Uint8Array.of(b16, n >> 8, n & 0xff);
  const out = new Uint8Array(5);
  out[0] = b16 + 1;
  new DataView(out.buffer).setUint32(1, n);
  return out;
}

/**
 * An int as a Number when it is safe, else a bigint (ids up to 2^64-1).
 * @param {number | bigint} value
 * @returns {number | bigint}
 */
function normInt(value) {
  if (typeof value === "bigint") {
    return value >= BigInt(Number.MIN_SAFE_INTEGER) && value <= BigInt(Number.MAX_SAFE_INTEGER)
      ? Number(value)
      : value;
  }
  return value;
}

/**
 * Push the msgpack encoding of `value` as `type` onto `out`.
 * @param {Type} type
 * @param {unknown} value
 * @param {string} where
 * @param {Uint8Array[]} out
 */
function encodeTyped(type, value, where, out) {
  const bad = () =>
    new InvalidArgument(`field '${where}': expected ${describe(type)}, got ${typeName(value)}`);
  if (type === "str") {
    if (typeof value !== "string") throw bad();
    out.push(plain.encode(value));
  } else if (type === "bin") {
    if (!(value instanceof Uint8Array)) throw bad();
    out.push(plain.encode(value));
  } else if (type === "int") {
    if (typeof value === "number" && Number.isSafeInteger(value)) {
      out.push(plain.encode(value));
    } else if (typeof value === "bigint") {
      const v = normInt(value);
      out.push(typeof v === "bigint" ? wide.encode(v) : plain.encode(v));
    } else {
      throw bad();
    }
  } else if (type === "float") {
    if (typeof value !== "number" || !Number.isFinite(value)) throw bad();
    out.push(asFloat.encode(value));
  } else if (type === "bool") {
    if (typeof value !== "boolean") throw bad();
    out.push(plain.encode(value));
  } else if (type[0] === "array") {
    if (!Array.isArray(value)) throw bad();
    const item = /** @type {Type} */ (type[1]);
    out.push(containerHeader(value.length, 0x90, 0xdc));
    value.forEach((v, i) => encodeTyped(item, v, `${where}[${i}]`, out));
  } else {
    throw new TypeError(`nested maps are not encoded in requests (${where})`);
  }
}

/**
 * @param {Type} type
 * @returns {string}
 */
function describe(type) {
  if (typeof type === "string") return type;
  if (type[0] === "array") return `array of ${describe(/** @type {Type} */ (type[1]))}`;
  return "map";
}

/**
 * Check `args` against the op's schema and put them in wire order.
 * Fields that are undefined or null are absent; an unknown field is an error
 * (InvalidArgument), as in the daemon: no option is ever silently ignored.
 *
 * @param {string} op
 * @param {Record<string, unknown>} args
 * @returns {Record<string, unknown>}
 */
export function checkArgs(op, args) {
  const schema = ARGS[op];
  if (schema === undefined) throw new InvalidArgument(`unknown operation '${op}'`);
  if (args === null || typeof args !== "object" || Array.isArray(args)) {
    throw new InvalidArgument(`${op}: arguments must be an object`);
  }
  const known = new Set(schema.map(([name]) => name));
  for (const name of Object.keys(args)) {
    if (!known.has(name)) throw new InvalidArgument(`${op}: unknown argument '${name}'`);
  }
  /** @type {Record<string, unknown>} */
  const out = {};
  for (const [name, type, required] of schema) {
    const value = args[name];
    if (value === undefined || value === null) {
      if (required) throw new InvalidArgument(`${op}: field '${name}' is required`);
      continue;
    }
    encodeTyped(type, value, name, []); // type check only
    out[name] = value;
  }
  return out;
}

/**
 * The whole frame (4-byte big-endian length, then the msgpack body) of a request.
 *
 * @param {number | bigint} id 0 to 2^64-1
 * @param {string} op
 * @param {Record<string, unknown>} args checked by checkArgs (wire order)
 * @returns {Buffer}
 */
export function encodeRequest(id, op, args) {
  const schema = ARGS[op];
  if (schema === undefined) throw new InvalidArgument(`unknown operation '${op}'`);
  if (
    !(typeof id === "number" ? Number.isSafeInteger(id) && id >= 0 : id >= 0n && id <= MAX_REQUEST_ID)
  ) {
    throw new RangeError(`request id ${id} is not an int in 0..2^64-1`);
  }
  /** @type {Uint8Array[]} */
  const parts = [Uint8Array.of(0, 0, 0, 0), Uint8Array.of(0x84)];
  parts.push(plain.encode("v"), plain.encode(PROTOCOL_VERSION));
  parts.push(plain.encode("id"));
  encodeTyped("int", id, "id", parts);
  parts.push(plain.encode("op"), plain.encode(op));
  parts.push(plain.encode("args"));
  const fields = schema.filter(([name]) => args[name] !== undefined && args[name] !== null);
  parts.push(containerHeader(fields.length, 0x80, 0xde));
  for (const [name, type] of fields) {
    parts.push(plain.encode(name));
    encodeTyped(type, args[name], name, parts);
  }
  const frame = Buffer.concat(parts);
  frame.writeUInt32BE(frame.length - 4, 0);
  return frame;
}

// ----------------------------------------------------------------- decoding

const decoder = new Decoder({ useBigInt64: true });

/**
 * Splits a byte stream into frame bodies.
 */
export class FrameReader {
  /** @param {number} [maxFrame] largest body accepted */
  constructor(maxFrame = MAX_RESPONSE_FRAME) {
    this.maxFrame = maxFrame;
    /** @type {Buffer[]} */
    this.chunks = [];
    this.length = 0;
  }

  /** @param {Uint8Array} chunk */
  push(chunk) {
    this.chunks.push(Buffer.from(chunk.buffer, chunk.byteOffset, chunk.byteLength));
    this.length += chunk.byteLength;
  }

  /** Bytes received but not yet returned as frames. */
  get buffered() {
    return this.length;
  }

  /**
   * Every complete frame body now buffered.
   * @returns {Generator<Buffer>}
   * @throws {ProtocolViolation} a length prefix above maxFrame
   */
  *frames() {
    while (this.length >= 4) {
      const head = this.#peek(4);
      const size = head.readUInt32BE(0);
      if (size > this.maxFrame) {
        throw new ProtocolViolation(
          `frame of ${size} bytes exceeds the limit of ${this.maxFrame} bytes`,
        );
      }
      if (this.length < 4 + size) return;
      const frame = this.#take(4 + size);
      yield frame.subarray(4);
    }
  }

  /** @param {number} n */
  #peek(n) {
    if (this.chunks[0].length < n) this.#merge(n);
    return this.chunks[0];
  }

  /** @param {number} n */
  #take(n) {
    this.#merge(n);
    const first = this.chunks[0];
    const out = first.subarray(0, n);
    if (first.length === n) this.chunks.shift();
    else this.chunks[0] = first.subarray(n);
    this.length -= n;
    return out;
  }

  /** Make the first chunk hold at least `n` bytes. @param {number} n */
  #merge(n) {
    if (this.chunks[0].length >= n) return;
    let have = 0;
    let count = 0;
    while (have < n) have += this.chunks[count++].length;
    this.chunks.splice(0, count, Buffer.concat(this.chunks.slice(0, count), have));
  }
}

/**
 * A decoded msgpack value with ints normalised (bigint only beyond 2^53) and
 * bins as Buffers.
 * @param {unknown} value
 * @returns {unknown}
 */
function normalize(value) {
  if (typeof value === "bigint") return normInt(value);
  if (value instanceof Uint8Array) return Buffer.from(value);
  if (Array.isArray(value)) return value.map(normalize);
  if (value !== null && typeof value === "object" && value.constructor === Object) {
    /** @type {Record<string, unknown>} */
    const out = {};
    for (const [k, v] of Object.entries(value)) out[k] = normalize(v);
    return out;
  }
  return value;
}

/**
 * @typedef {object} Response
 * @property {number | bigint | null} id the request's id; null: a connection-level error
 * @property {Record<string, unknown> | null} result
 * @property {import("./errors.js").WireError | null} error
 */

/**
 * One response frame body, decoded (the result is not yet checked against its op).
 * @param {Uint8Array} body
 * @returns {Response}
 * @throws {ProtocolViolation}
 */
export function decodeResponse(body) {
  let obj;
  try {
    obj = normalize(decoder.decode(body));
  } catch (exc) {
    throw new ProtocolViolation(`response is not valid msgpack: ${/** @type {Error} */ (exc).message}`);
  }
  if (!isMap(obj) || obj.v !== PROTOCOL_VERSION) {
    throw new ProtocolViolation("response is not a version-1 map");
  }
  const id = obj.id ?? null;
  if (id !== null && !isInt(id)) throw new ProtocolViolation("response id is not an int");
  const err = obj.error;
  if (err !== undefined && err !== null) {
    if (
      !isMap(err) ||
      typeof err.code !== "number" ||
      !Number.isInteger(err.code) ||
      typeof err.name !== "string" ||
      typeof err.message !== "string"
    ) {
      throw new ProtocolViolation("response error is not {code, name, message}");
    }
    const retryAfter = typeof err.retry_after === "number" ? err.retry_after : undefined;
    const error = errorFromWire({
      code: err.code,
      name: err.name,
      message: err.message,
      retry_after: retryAfter,
    });
    return { id: /** @type {number | bigint | null} */ (id), result: null, error };
  }
  if (!isMap(obj.result)) throw new ProtocolViolation("response has neither result nor error");
  return { id: /** @type {number | bigint | null} */ (id), result: obj.result, error: null };
}

/**
 * @param {unknown} v
 * @returns {v is Record<string, unknown>}
 */
function isMap(v) {
  return v !== null && typeof v === "object" && !Array.isArray(v) && !(v instanceof Uint8Array);
}

/**
 * @param {unknown} v
 * @returns {boolean}
 */
function isInt(v) {
  return (typeof v === "number" && Number.isInteger(v)) || typeof v === "bigint";
}

/**
 * Check a decoded value against a result type; copy known fields, drop unknown ones.
 * @param {Type} type
 * @param {unknown} value
 * @param {string} where
 * @returns {unknown}
 */
function readTyped(type, value, where) {
  const bad = () =>
    new ProtocolViolation(`result field '${where}': expected ${describe(type)}, got ${typeName(value)}`);
  if (type === "str" || type === "bool") {
    if (typeof value !== (type === "str" ? "string" : "boolean")) throw bad();
    return value;
  }
  if (type === "bin") {
    if (!(value instanceof Uint8Array)) throw bad();
    return value;
  }
  if (type === "int") {
    if (!isInt(value)) throw bad();
    return value;
  }
  if (type === "float") {
    // float 64 or float 32; an int is accepted where a float is expected.
    if (typeof value !== "number" && typeof value !== "bigint") throw bad();
    return Number(value);
  }
  if (type[0] === "array") {
    if (!Array.isArray(value)) throw bad();
    const item = /** @type {Type} */ (type[1]);
    return value.map((v, i) => readTyped(item, v, `${where}[${i}]`));
  }
  if (!isMap(value)) throw bad();
  return readMap(/** @type {Schema} */ (type), value, where);
}

/**
 * @param {Schema} schema
 * @param {Record<string, unknown>} value
 * @param {string} path
 * @returns {Record<string, unknown>}
 */
function readMap(schema, value, path) {
  /** @type {Record<string, unknown>} */
  const out = {};
  if (OPEN.has(schema)) Object.assign(out, value);
  for (const [name, type, required] of schema) {
    const where = path ? `${path}.${name}` : name;
    const v = value[name];
    if (v === undefined || v === null) {
      if (required) throw new ProtocolViolation(`result field '${where}' is missing`);
      delete out[name];
      continue;
    }
    out[name] = readTyped(type, v, where);
  }
  return out;
}

/**
 * The result of `op` as a plain object with the wire field names: every field
 * checked for its type, unknown fields (a newer daemon's) left out, except in
 * JWKs, whose unknown members are kept (PROTOCOL.md, jwks).
 *
 * @param {string} op
 * @param {Record<string, unknown>} result
 * @returns {Record<string, unknown>}
 * @throws {ProtocolViolation}
 */
export function decodeResult(op, result) {
  const schema = RESULTS[op];
  if (schema === undefined) throw new TypeError(`unknown operation '${op}'`);
  return readMap(schema, result, "");
}
