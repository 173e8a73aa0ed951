// JWS and JWT (src/jose.js) against a real signd, whose socket is
// $SIGND_TEST_SOCKET (tests/test_node_client.py starts one and sets it).
// Every token is verified independently: the JWK Set signd exports, picked by
// the header's kid, imported and checked by node:crypto, with its own table of
// what each JWS alg means (RFC 7518), not the package's.

import assert from "node:assert/strict";
import crypto from "node:crypto";
import { after, before, describe, test } from "node:test";

import * as signd from "../src/index.js";

const SOCKET = process.env.SIGND_TEST_SOCKET;
if (!SOCKET) {
  throw new Error(
    "SIGND_TEST_SOCKET is not set: run these tests through tests/test_node_client.py " +
      "(see clients/node/README.md), or point it at a running signd's socket",
  );
}

const suffix = crypto.randomBytes(4).toString("hex");
const P256 = `jose-p256-${suffix}`;
const P384 = `jose-p384-${suffix}`;
const K1 = `jose-k1-${suffix}`;
const ED = `jose-ed-${suffix}`;
const RSA = `jose-rsa-${suffix}`;
const ROT = `jose-rot-${suffix}`;

/** The verifier's own view of RFC 7518 section 3 and RFC 8037. */
const VERIFY = {
  ES256: { key: P256, hash: "sha256", dsaEncoding: "ieee-p1363", sigLength: 64 },
  ES384: { key: P384, hash: "sha384", dsaEncoding: "ieee-p1363", sigLength: 96 },
  ES256K: { key: K1, hash: "sha256", dsaEncoding: "ieee-p1363", sigLength: 64 },
  EdDSA: { key: ED, hash: null, sigLength: 64 },
  RS256: { key: RSA, hash: "sha256", padding: crypto.constants.RSA_PKCS1_PADDING, sigLength: 256 },
  RS384: { key: RSA, hash: "sha384", padding: crypto.constants.RSA_PKCS1_PADDING, sigLength: 256 },
  RS512: { key: RSA, hash: "sha512", padding: crypto.constants.RSA_PKCS1_PADDING, sigLength: 256 },
  PS256: { key: RSA, hash: "sha256", padding: crypto.constants.RSA_PKCS1_PSS_PADDING, sigLength: 256 },
  PS384: { key: RSA, hash: "sha384", padding: crypto.constants.RSA_PKCS1_PSS_PADDING, sigLength: 256 },
  PS512: { key: RSA, hash: "sha512", padding: crypto.constants.RSA_PKCS1_PSS_PADDING, sigLength: 256 },
};

/** @type {signd.Client} */
let client;
/** @type {Record<string, signd.SigningKey>} by key name */
const handles = {};

before(async () => {
  client = await signd.Client.connect({ socket: SOCKET });
  await Promise.all([
    client.createKey(P256, "ec-p256"),
    client.createKey(P384, "ec-p384"),
    client.createKey(K1, "ec-secp256k1"),
    client.createKey(ED, "ed25519"),
    client.createKey(RSA, "rsa-2048"),
    client.createKey(ROT, "ec-p256"),
  ]);
  for (const name of [P256, P384, K1, ED, RSA]) handles[name] = await client.signingKey(name);
});

after(async () => {
  await client.close();
});

/** @param {string} part */
const json = (part) => JSON.parse(Buffer.from(part, "base64url").toString("utf8"));

/**
 * Verify a compact JWS with node:crypto and the JWK Set: the JWK is the one
 * whose kid the header names. Returns the header and the payload's bytes, or
 * null if the signature does not verify.
 * @param {string} token
 * @param {{keys: Record<string, unknown>[]}} jwks
 */
function verifyJws(token, jwks) {
  const parts = token.split(".");
  assert.equal(parts.length, 3, "compact JWS: three parts");
  for (const part of parts) assert.match(part, /^[A-Za-z0-9_-]*$/, "base64url without padding");
  const header = json(parts[0]);
  const v = VERIFY[header.alg];
  assert.ok(v, `unexpected alg ${header.alg}`);
  const jwk = jwks.keys.find((k) => k.kid === header.kid);
  assert.ok(jwk, `no JWK with kid ${header.kid}`);
  const key = crypto.createPublicKey({ key: jwk, format: "jwk" });
  const signature = Buffer.from(parts[2], "base64url");
  assert.equal(signature.length, v.sigLength);
  /** @type {crypto.VerifyKeyObjectInput} */
  const params = { key };
  if (v.dsaEncoding) params.dsaEncoding = v.dsaEncoding;
  if (v.padding !== undefined) params.padding = v.padding;
  if (v.padding === crypto.constants.RSA_PKCS1_PSS_PADDING) {
    // RFC 7518 3.5: MGF1 with the same hash, salt as long as the digest.
    params.saltLength = crypto.constants.RSA_PSS_SALTLEN_DIGEST;
  }
  const signingInput = Buffer.from(`${parts[0]}.${parts[1]}`, "ascii");
  if (!crypto.verify(v.hash, signingInput, params, signature)) return null;
  return { header, payload: Buffer.from(parts[1], "base64url"), jwk };
}

/**
 * The same token with other claims in its payload (signature unchanged).
 * @param {string} token
 * @param {object} claims
 */
function tamper(token, claims) {
  const [h, , s] = token.split(".");
  return `${h}.${Buffer.from(JSON.stringify(claims)).toString("base64url")}.${s}`;
}

/** Requests sent on the client's connection so far. */
const sent = () => client._conn.requests;

describe("JWT with each algorithm", () => {
  test("signJwt: ES256, ES384, ES256K, EdDSA, RS256/384/512, PS256/384/512 verify with node:crypto and the JWKS", async () => {
    const algs = Object.keys(VERIFY);
    const claims = (alg) => ({ sub: "alice", alg_under_test: alg, n: 42, nested: { ok: true }, name: "Zoë" });
    const tokens = await Promise.all(
      algs.map((alg) => signd.signJwt(handles[VERIFY[alg].key], claims(alg), { algorithm: alg })),
    );
    const jwks = await client.jwks([P256, P384, K1, ED, RSA]);
    assert.deepEqual(jwks.keys.map((k) => k.kid), [`${P256}:1`, `${P384}:1`, `${K1}:1`, `${ED}:1`, `${RSA}:1`]);
    algs.forEach((alg, i) => {
      const ok = verifyJws(tokens[i], jwks);
      assert.ok(ok, `${alg}: signature does not verify`);
      assert.deepEqual(ok.header, { alg, kid: `${VERIFY[alg].key}:1`, typ: "JWT" }, alg);
      assert.deepEqual(JSON.parse(ok.payload.toString("utf8")), claims(alg), alg);
      if (ok.jwk.alg !== undefined) assert.equal(ok.jwk.alg, alg, "the JWK's alg is the header's");
      assert.equal(verifyJws(tamper(tokens[i], { ...claims(alg), sub: "mallory" }), jwks), null, `${alg}: tampered`);
    });
  });

  test("the default algorithm follows the key type; the handle has the version's public key", async () => {
    const jwks = await client.jwks([P256, P384, K1, ED, RSA]);
    const expected = { [P256]: "ES256", [P384]: "ES384", [K1]: "ES256K", [ED]: "EdDSA", [RSA]: "RS256" };
    for (const [name, alg] of Object.entries(expected)) {
      const key = handles[name];
      assert.deepEqual(
        [key.name, key.version, key.kid, key.pinned, signd.defaultAlgorithm(key.type)],
        [name, 1, `${name}:1`, false, alg],
      );
      assert.ok(key.publicKey instanceof crypto.KeyObject);
      assert.equal(key.publicKey.type, "public");
      const jwk = jwks.keys.find((k) => k.kid === key.kid);
      const mine = key.publicKey.export({ format: "jwk" });
      for (const member of ["kty", "crv", "x", "y", "n", "e"]) assert.equal(mine[member], jwk[member], member);
      const token = await signd.signJwt(key, { sub: name });
      const ok = verifyJws(token, jwks);
      assert.ok(ok);
      assert.equal(ok.header.alg, alg);
    }
  });

  test("signJws: bytes or a string, extra headers, a payload too large for one message", async () => {
    const jwks = await client.jwks([P256, ED]);
    const bytes = crypto.randomBytes(100);
    const jws = await signd.signJws(handles[P256], bytes, {
      headers: { cty: "application/octet-stream", kid: `${P256}:1`, alg: "ES256" },
    });
    const ok = verifyJws(jws, jwks);
    assert.ok(ok);
    assert.deepEqual(ok.header, { alg: "ES256", kid: `${P256}:1`, cty: "application/octet-stream" });
    assert.deepEqual(ok.payload, bytes);

    const text = await signd.signJws(handles[ED], "héllo");
    assert.equal(verifyJws(text, jwks).payload.toString("utf8"), "héllo");

    // 200 KB: hashed here and sent as a digest (ES256); EdDSA sends it whole.
    const big = crypto.randomBytes(200_000);
    for (const key of [handles[P256], handles[ED]]) {
      const token = await signd.signJws(key, big);
      assert.deepEqual(verifyJws(token, jwks)?.payload, big);
    }
  });
});

// A handle that kept moving on would loop: fail in seconds, not at the runner's limit.
describe("rotation", { timeout: 20_000 }, () => {
  test("old tokens keep verifying; a handle without version follows, a pinned one rejects", async () => {
    const follow = await client.signingKey(ROT);
    const pinned = await client.signingKey(ROT, { version: 1 });
    assert.deepEqual([follow.version, follow.pinned, pinned.version, pinned.pinned], [1, false, 1, true]);
    const claims = { sub: "bob" };
    const old = await signd.signJwt(follow, claims);
    const oldPinned = await signd.signJwt(pinned, claims);

    await client.rotate(ROT);
    const jwks = await client.jwks([ROT]);
    assert.deepEqual(jwks.keys.map((k) => k.kid), [`${ROT}:2`, `${ROT}:1`]);
    for (const token of [old, oldPinned]) {
      const ok = verifyJws(token, jwks);
      assert.ok(ok, "a token signed before the rotation verifies after it");
      assert.equal(ok.header.kid, `${ROT}:1`);
    }

    // Version 1 may no longer sign: one refused sign, one public_key, one sign.
    let n = sent();
    const fresh = await signd.signJwt(follow, claims);
    assert.equal(sent() - n, 3);
    const ok = verifyJws(fresh, jwks);
    assert.ok(ok);
    assert.equal(ok.header.kid, `${ROT}:2`);
    assert.deepEqual(JSON.parse(ok.payload), claims);
    // The successor is remembered: one round trip again.
    n = sent();
    assert.equal(json((await signd.signJwt(follow, claims)).split(".")[0]).kid, `${ROT}:2`);
    assert.equal(sent() - n, 1);
    assert.equal(follow.version, 1, "the handle itself is unchanged");

    n = sent();
    await assert.rejects(signd.signJwt(pinned, claims), signd.VersionNotUsable);
    assert.equal(sent() - n, 1, "a pinned handle does not move");

    const latest = await pinned.latest();
    assert.deepEqual([latest.version, latest.pinned], [2, false]);
  });

  test("a handle moves on once per call: if the current version cannot sign either, the error comes back", async () => {
    const follow = await client.signingKey(ROT); // version 2, after the test above
    await client.rotate(ROT);
    await client.disable(ROT, 3);
    try {
      const n = sent();
      await assert.rejects(signd.signJwt(follow, { sub: "carol" }), signd.VersionNotUsable);
      assert.equal(sent() - n, 3, "sign (v2), public_key (v3), sign (v3), then the error");
    } finally {
      await client.enable(ROT, 3);
    }
    const token = await signd.signJwt(follow, { sub: "carol" });
    assert.equal(verifyJws(token, await client.jwks([ROT])).header.kid, `${ROT}:3`);
  });
});

describe("bad input: clear errors, nothing sent", () => {
  /**
   * @param {() => Promise<unknown>} fn
   * @param {RegExp} message
   */
  async function refused(fn, message) {
    const n = sent();
    await assert.rejects(fn, (err) => {
      assert.ok(err instanceof TypeError, `${err}`);
      assert.equal(err.code, "ERR_INVALID_ARG_VALUE");
      assert.match(err.message, message);
      return true;
    });
    assert.equal(sent(), n, "nothing sent");
  }

  test("an algorithm that does not fit the key, an unknown one, alg or kid set by a header", async () => {
    await refused(
      () => signd.signJwt(handles[ED], {}, { algorithm: "ES256" }),
      new RegExp(`^JWS algorithm ES256 needs a ec-p256 key; key '${ED}' is ed25519$`),
    );
    await refused(
      () => signd.signJwt(handles[P256], {}, { algorithm: "PS256" }),
      /^JWS algorithm PS256 needs a rsa-2048 or rsa-3072 or rsa-4096 key; key '.*' is ec-p256$/,
    );
    await refused(
      () => signd.signJwt(handles[RSA], {}, { algorithm: "ES384" }),
      /needs a ec-p384 key; key '.*' is rsa-2048$/,
    );
    await refused(
      () => signd.signJwt(handles[P256], {}, { algorithm: "HS256" }),
      /^unsupported JWS algorithm "HS256"; supported: ES256, ES384, ES256K, EdDSA, RS256, RS384, RS512, PS256, PS384, PS512$/,
    );
    await refused(() => signd.signJwt(handles[P256], {}, { algorithm: "none" }), /unsupported JWS algorithm "none"/);
    await refused(
      () => signd.signJwt(handles[P256], {}, { headers: { kid: "other:1" } }),
      new RegExp(`^header 'kid' is set by the key: "${P256}:1", not "other:1"$`),
    );
    await refused(
      () => signd.signJws(handles[P256], Buffer.from("x"), { headers: { alg: "none" } }),
      /^header 'alg' is set by the key: "ES256", not "none"$/,
    );
  });

  test("claims, headers, payload and key of the wrong kind", async () => {
    await refused(() => signd.signJwt(handles[P256], { n: 1n }), /^JWT claims and headers must be JSON values: /);
    await refused(() => signd.signJwt(handles[P256], ["a"]), /JWT claims must be a JSON object/);
    await refused(() => signd.signJwt(handles[P256], {}, { headers: "x" }), /headers must be a plain object/);
    await refused(() => signd.signJws(handles[P256], 42), /payload must be a Uint8Array/);
    await refused(() => signd.signJwt({ name: P256, version: 1 }, {}), /key must be a SigningKey/);
  });

  test("signingKey of a missing key or version", async () => {
    await assert.rejects(client.signingKey(`no-such-${suffix}`), signd.KeyNotFound);
    await assert.rejects(client.signingKey(P256, { version: 9 }), signd.VersionNotFound);
  });
});
