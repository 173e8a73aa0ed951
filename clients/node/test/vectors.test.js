// The Node client's side of the golden frames in tests/vectors/frames.json:
// every request vector must encode to exactly its bytes through the client's
// request builders, and every response vector must decode to the expected
// result or error class. The error table below is written out independently
// of the code under test.

import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { test } from "node:test";

import { Decoder, encode } from "@msgpack/msgpack";

import * as signd from "../src/index.js";

const { calls, OPS, METHODS, FrameReader, decodeResponse, decodeResult, encodeRequest } = signd;

const FRAMES = new URL("../../../tests/vectors/frames.json", import.meta.url);

/**
 * frames.json, with ints too large for a JavaScript number (ids up to 2^64-1)
 * kept exact as bigints.
 */
function loadDoc() {
  const text = readFileSync(FRAMES, "utf8").replace(
    /([:[,]\s*)(\d{16,})(?=\s*[,}\]])/g,
    (all, pre, digits) =>
      BigInt(digits) > BigInt(Number.MAX_SAFE_INTEGER) ? `${pre}{"$int": "${digits}"}` : all,
  );
  return JSON.parse(text);
}

const DOC = loadDoc();
const REQUESTS = DOC.vectors.filter((v) => v.direction === "request");
const RESULTS = DOC.vectors.filter((v) => v.direction === "response" && "result" in v.message);
const ERRORS = DOC.vectors.filter((v) => v.direction === "response" && "error" in v.message);

/** name -> [code, class name, retryable], written out here. */
const ERROR_TABLE = {
  malformed_frame: [100, "MalformedFrame", false],
  frame_too_large: [101, "FrameTooLarge", false],
  unsupported_version: [102, "UnsupportedVersion", false],
  unknown_operation: [103, "UnknownOperation", false],
  invalid_request: [104, "InvalidRequest", false],
  invalid_argument: [200, "InvalidArgument", false],
  invalid_digest: [201, "InvalidDigest", false],
  unsupported_algorithm: [202, "UnsupportedAlgorithm", false],
  key_not_found: [300, "KeyNotFound", false],
  version_not_found: [301, "VersionNotFound", false],
  key_exists: [302, "KeyExists", false],
  version_not_usable: [303, "VersionNotUsable", false],
  deletion_not_allowed: [304, "DeletionNotAllowed", false],
  conflict: [305, "Conflict", true],
  position_used: [306, "PositionUsed", false],
  permission_denied: [400, "PermissionDenied", false],
  rate_limited: [401, "RateLimited", true],
  internal_error: [500, "InternalError", false],
  token_unavailable: [501, "TokenUnavailable", true],
  token_error: [502, "TokenError", false],
  busy: [503, "Busy", true],
  shutting_down: [504, "ShuttingDown", true],
  deadline_exceeded: [505, "DeadlineExceeded", true],
};

/** How a user calls each builder, from a vector's wire args (the same calls as the Client's methods). */
const BUILD = {
  create_key: ({ key, type, ...o }) => calls.createKey(key, type, o),
  list_keys: () => calls.listKeys(),
  key_info: ({ key }) => calls.keyInfo(key),
  public_key: ({ key, ...o }) => calls.publicKey(key, o),
  jwks: ({ keys }) => calls.jwks(keys),
  sign: ({ key, ...o }) => calls.sign(key, o),
  sign_batch: ({ key, ...o }) => calls.signBatch(key, o),
  verify: ({ key, ...o }) => calls.verify(key, o),
  rotate: ({ key, ...o }) => calls.rotate(key, o),
  update_key: ({ key, ...o }) => calls.updateKey(key, o),
  disable: ({ key, version }) => calls.disable(key, version),
  enable: ({ key, version }) => calls.enable(key, version),
  destroy: ({ key, ...o }) => calls.destroy(key, o),
  health: () => calls.health(),
  whoami: () => calls.whoami(),
  backup: (o) => calls.backup(o),
  restore: (a) => calls.restore(a),
  import_params: ({ key }) => calls.importParams(key),
  import_key: ({ key, type, ...o }) => calls.importKey(key, type, o),
};

/** The vector file's JSON as msgpack values: {"$bin": hex} is a Buffer. */
function fromJson(value) {
  if (Array.isArray(value)) return value.map(fromJson);
  if (value !== null && typeof value === "object") {
    const keys = Object.keys(value);
    if (keys.length === 1 && keys[0] === "$bin") return Buffer.from(value.$bin, "hex");
    if (keys.length === 1 && keys[0] === "$int") return BigInt(value.$int);
    return Object.fromEntries(keys.map((k) => [k, fromJson(value[k])]));
  }
  return value;
}

/** A decoded msgpack value in fromJson's terms: bins as Buffers, small ints as numbers. */
function asExpected(value) {
  if (typeof value === "bigint") return value > BigInt(Number.MAX_SAFE_INTEGER) ? value : Number(value);
  if (value instanceof Uint8Array) return Buffer.from(value);
  if (Array.isArray(value)) return value.map(asExpected);
  if (value !== null && typeof value === "object") {
    return Object.fromEntries(Object.entries(value).map(([k, v]) => [k, asExpected(v)]));
  }
  return value;
}

/** Decode one response frame the way the client does: framing, then body. */
function receive(hex) {
  const reader = new FrameReader(DOC.max_frame);
  reader.push(Buffer.from(hex, "hex"));
  const bodies = [...reader.frames()];
  assert.equal(bodies.length, 1);
  assert.equal(reader.buffered, 0);
  return decodeResponse(bodies[0]);
}

// ----------------------------------------------------------------- coverage

test("every op the client knows has a request and a result vector, and no other op has one", () => {
  assert.deepEqual(new Set(Object.keys(BUILD)), new Set(OPS));
  assert.deepEqual(new Set(REQUESTS.map((v) => v.op)), new Set(OPS));
  assert.deepEqual(new Set(RESULTS.map((v) => v.op)), new Set(OPS));
  for (const op of OPS) {
    assert.equal(typeof signd.Client.prototype[METHODS[op]], "function", `Client.${METHODS[op]}`);
  }
});

test("every op has a retry class, and the idempotent sets follow from it", () => {
  assert.deepEqual(new Set(Object.keys(signd.RETRY)), new Set(OPS));
  for (const op of OPS) {
    assert.ok(["safe", "with_key", "never"].includes(signd.RETRY[op]), op);
    assert.equal(signd.IDEMPOTENT_OPS.has(op), signd.RETRY[op] === "safe", op);
    assert.equal(signd.IDEMPOTENCY_KEY_OPS.has(op), signd.RETRY[op] === "with_key", op);
  }
});

test("every error code the client knows has a vector, and no other code has one", () => {
  const vectorCodes = new Set(ERRORS.map((v) => v.message.error.code));
  const clientCodes = new Set(Object.keys(signd.ERROR_CLASSES).map(Number));
  const tableCodes = new Set(Object.values(ERROR_TABLE).map(([code]) => code));
  assert.deepEqual(vectorCodes, clientCodes);
  assert.deepEqual(tableCodes, clientCodes);
  for (const [name, [code, className, retryable]] of Object.entries(ERROR_TABLE)) {
    const cls = signd[className];
    assert.equal(signd.ERROR_CLASSES[code], cls, className);
    assert.equal(cls.code, code);
    assert.equal(cls.wireName, name);
    assert.equal(cls.retryable, retryable);
  }
});

// ----------------------------------------------------------------- requests

for (const vector of REQUESTS) {
  test(`request ${vector.name} encodes to exactly its bytes`, () => {
    const message = fromJson(vector.message);
    const call = BUILD[message.op](message.args);
    assert.equal(call.op, vector.op);
    const frame = encodeRequest(message.id, call.op, call.args);
    assert.equal(frame.toString("hex"), vector.hex);
    // And the bytes are the message.
    assert.equal(frame.readUInt32BE(0), frame.length - 4);
    const body = new Decoder({ useBigInt64: true }).decode(frame.subarray(4));
    assert.deepEqual(asExpected(body), message);
  });
}

// ---------------------------------------------------------------- responses

for (const vector of RESULTS) {
  test(`result ${vector.name} decodes`, () => {
    const message = fromJson(vector.message);
    const resp = receive(vector.hex);
    assert.equal(resp.id, message.id);
    assert.equal(resp.error, null);
    assert.deepEqual(decodeResult(vector.op, resp.result), message.result);
  });
}

for (const vector of ERRORS) {
  test(`error ${vector.name} decodes to its class`, () => {
    const { id, error } = vector.message;
    const [code, className, retryable] = ERROR_TABLE[error.name];
    const resp = receive(vector.hex);
    assert.equal(resp.id, id);
    assert.equal(resp.result, null);
    assert.equal(resp.error.constructor, signd[className]);
    assert.ok(resp.error instanceof signd.WireError);
    assert.ok(resp.error instanceof Error);
    assert.equal(resp.error.code, code);
    assert.equal(resp.error.code, error.code);
    assert.equal(resp.error.name, error.name);
    assert.equal(resp.error.message, error.message);
    assert.equal(resp.error.retryable, retryable);
    if (error.name === "rate_limited") assert.equal(resp.error.retryAfter, error.retry_after);
  });
}

// ------------------------------------------------------------------- extras

/** Add a field a newer daemon might send to every map, nested ones too. */
function withUnknownFields(value) {
  if (Array.isArray(value)) return value.map(withUnknownFields);
  if (value !== null && typeof value === "object" && !(value instanceof Uint8Array)) {
    const out = Object.fromEntries(Object.entries(value).map(([k, v]) => [k, withUnknownFields(v)]));
    return { ...out, x_future: [1, "a"] };
  }
  return value;
}

for (const vector of RESULTS) {
  test(`result ${vector.name} decodes with unknown fields added`, () => {
    const message = fromJson(vector.message);
    const grown = { ...message, result: withUnknownFields(message.result), trace: "abc" };
    const body = encode(grown, { useBigInt64: true });
    const frame = Buffer.concat([Buffer.alloc(4), body]);
    frame.writeUInt32BE(body.length, 0);
    const resp = receive(frame.toString("hex"));
    // Unknown fields are left out, except a JWK's members, which are kept.
    const expected =
      vector.op === "jwks" ? { keys: grown.result.keys.map(({ x_future, ...k }) => ({ ...k, x_future })) } : message.result;
    assert.deepEqual(decodeResult(vector.op, resp.result), expected);
  });
}

test("a response split into single bytes is reassembled", () => {
  const vector = RESULTS.find((v) => v.op === "sign_batch");
  const bytes = Buffer.from(vector.hex + vector.hex, "hex");
  const reader = new FrameReader();
  const bodies = [];
  for (const b of bytes) {
    reader.push(Uint8Array.of(b));
    bodies.push(...reader.frames());
  }
  assert.equal(bodies.length, 2);
  assert.equal(reader.buffered, 0);
  assert.deepEqual(bodies[0], bytes.subarray(4, bytes.length / 2));
});

test("an oversized response length prefix is a protocol violation", () => {
  const reader = new FrameReader(1024);
  reader.push(Buffer.from("00000401", "hex"));
  assert.throws(() => [...reader.frames()], signd.ProtocolViolation);
});

test("an unknown error code is kept", () => {
  const body = encode({ v: 1, id: 9, error: { code: 599, name: "future_thing", message: "later" } });
  const frame = Buffer.concat([Buffer.from([0, 0, 0, body.length]), body]);
  const { error } = receive(frame.toString("hex"));
  assert.ok(error instanceof signd.WireError);
  assert.equal(error.code, 599);
  assert.equal(error.name, "future_thing");
  assert.equal(error.message, "later");
  assert.equal(error.retryable, false);
  assert.match(String(error), /599/);
});

test("a request over the frame limit is refused locally", () => {
  const call = calls.sign("k", { message: Buffer.alloc(DOC.max_frame) });
  const frame = encodeRequest(1, call.op, call.args);
  assert.ok(frame.length - 4 > DOC.max_frame);
});

// Requests the daemon refuses with 200 invalid_argument: the builders refuse
// them already, before anything is sent. (A float with an integral value, such
// as version 1.0, cannot be told from an int in JavaScript: it is sent as one.)
const LOCAL_200 = DOC.rejected_requests.filter(
  (v) => v.error.code === 200 && v.name !== "args_version_float",
);

for (const vector of LOCAL_200) {
  test(`rejected request ${vector.name} is refused locally`, () => {
    const { op, args } = fromJson(vector.message);
    assert.throws(() => signd.checkArgs(op, args), signd.InvalidArgument);
  });
}

test("destroy needs exactly one of version and all: true", () => {
  assert.throws(() => calls.destroy("k", {}), signd.InvalidArgument);
  assert.throws(() => calls.destroy("k", { version: 1, all: true }), signd.InvalidArgument);
  assert.throws(() => calls.destroy("k", { all: false }), signd.InvalidArgument);
  assert.deepEqual(calls.destroy("k", { version: 2, all: false }).args, { key: "k", version: 2 });
});

test("idempotency keys are checked locally", () => {
  assert.throws(() => calls.rotate("k", { idempotency_key: "has space" }), signd.InvalidArgument);
  assert.throws(() => calls.createKey("k", "ec-p256", { idempotency_key: "" }), signd.InvalidArgument);
  assert.throws(() => calls.rotate("k", { idempotency_key: "x".repeat(129) }), signd.InvalidArgument);
});

test("restore sends check only when true; its bytes are checked locally", () => {
  const bin = Buffer.from("00", "hex");
  const args = { key: "k", header: bin, header_mac: bin, entry: bin, entry_mac: bin };
  assert.deepEqual(calls.restore({ ...args, check: false }).args, args);
  assert.deepEqual(calls.restore({ ...args, check: true }).args, { ...args, check: true });
  assert.throws(() => calls.restore({ ...args, header_mac: "00" }), signd.InvalidArgument);
  assert.throws(() => calls.restore({ ...args, entry: undefined }), signd.InvalidArgument);
  assert.throws(() => calls.restore({ ...args, headerMac: bin }), signd.InvalidArgument);
  assert.throws(() => calls.restore(null), signd.InvalidArgument);
});

test("backup takes no options, or the keys to back up", () => {
  assert.deepEqual(calls.backup(), { op: "backup", args: {} });
  assert.deepEqual(calls.backup({ keys: ["a"] }).args, { keys: ["a"] });
  assert.throws(() => calls.backup({ keys: "a" }), signd.InvalidArgument);
  assert.throws(() => calls.backup({ key: "a" }), signd.InvalidArgument);
});
