// Ethereum signatures from the Node client against a real signd ($SIGND_TEST_SOCKET,
// set by tests/test_node_client.py): an ec-secp256k1 key signs a Keccak-256 digest with
// format "eth" (r‖s‖v). Checked independently of the daemon: the public key recovered
// here from (r, s, v) and the digest, with plain BigInt arithmetic on secp256k1, must be
// the version's public key from its PEM, and s must be low (EIP-2).

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
const K1 = `node-k1-${suffix}`;
const P256 = `node-p256-eth-${suffix}`;
const HELLO = Buffer.from("hello");
// Keccak-256("hello"), as Ethereum hashes (SHA3-256("hello") is 3338be69...).
const KECCAK_HELLO = Buffer.from(
  "1c8aff950685c2ed4bc3174f3472287b56d9517b9c948127319a09a7a36deac8",
  "hex",
);

// ---------------------------------------------------------------- secp256k1

const P = 2n ** 256n - 2n ** 32n - 977n;
const N = 0xfffffffffffffffffffffffffffffffebaaedce6af48a03bbfd25e8cd0364141n;
const G = [
  0x79be667ef9dcbbac55a06295ce870b07029bfcdb2dce28d959f2815b16f81798n,
  0x483ada7726a3c4655da4fbfc0e1108a8fd17b448a68554199c47d08ffb10d4b8n,
];

const mod = (a, m) => ((a % m) + m) % m;

function inv(a, m) {
  let [r0, r1, t0, t1] = [mod(a, m), m, 1n, 0n];
  while (r1 !== 0n) {
    const q = r0 / r1;
    [r0, r1, t0, t1] = [r1, r0 - q * r1, t1, t0 - q * t1];
  }
  return mod(t0, m);
}

function powmod(b, e, m) {
  let result = 1n;
  b = mod(b, m);
  while (e > 0n) {
    if (e & 1n) result = (result * b) % m;
    b = (b * b) % m;
    e >>= 1n;
  }
  return result;
}

/** Affine point addition; null is the point at infinity. */
function add(a, b) {
  if (a === null) return b;
  if (b === null) return a;
  if (a[0] === b[0] && mod(a[1] + b[1], P) === 0n) return null;
  const l =
    a[0] === b[0]
      ? mod(3n * a[0] * a[0] * inv(2n * a[1], P), P)
      : mod((b[1] - a[1]) * inv(b[0] - a[0], P), P);
  const x = mod(l * l - a[0] - b[0], P);
  return [x, mod(l * (a[0] - x) - a[1], P)];
}

function mul(k, pt) {
  let result = null;
  for (let bit = BigInt(k.toString(2).length) - 1n; bit >= 0n; bit--) {
    result = add(result, result);
    if ((k >> bit) & 1n) result = add(result, pt);
  }
  return result;
}

const toBig = (buf) => BigInt(`0x${Buffer.from(buf).toString("hex") || "0"}`);

/** The public key that signed `digest` with (r, s, recid): Q = r⁻¹(sR − eG). */
function recover(digest, r, s, recid) {
  const y2 = mod(r ** 3n + 7n, P);
  let y = powmod(y2, (P + 1n) / 4n, P);
  assert.equal((y * y) % P, y2, "r is the x of a curve point");
  if ((y & 1n) !== BigInt(recid)) y = P - y;
  const e = toBig(digest);
  const rInv = inv(r, N);
  return add(mul(mod(s * rInv, N), [r, y]), mul(mod(-e * rInv, N), G));
}

/** (x, y) of a PEM public key: the uncompressed point ends its SPKI. */
function pointOf(pem) {
  const spki = crypto.createPublicKey(pem).export({ format: "der", type: "spki" });
  const point = spki.subarray(spki.length - 65);
  assert.equal(point[0], 4);
  return [toBig(point.subarray(1, 33)), toBig(point.subarray(33))];
}

/** Split and check an `eth` signature; returns [r, s, v]. */
function parts(signature) {
  assert.equal(signature.length, 65, "r(32) ‖ s(32) ‖ v(1)");
  const r = toBig(signature.subarray(0, 32));
  const s = toBig(signature.subarray(32, 64));
  const v = signature[64];
  assert.ok(v === 0 || v === 1, `v is a recovery id, got ${v}`);
  assert.ok(r > 0n && r < N);
  assert.ok(s > 0n && s <= N / 2n, "s is low (EIP-2)");
  return [r, s, v];
}

// -------------------------------------------------------------------- tests

/** @type {signd.Client} */
let client;
let pem;
let info;

before(async () => {
  client = await signd.Client.connect({ socket: SOCKET });
  info = await client.createKey(K1, "ec-secp256k1");
  pem = info.versions[0].public_key_pem;
  await client.createKey(P256, "ec-p256");
});

after(async () => {
  await client.close();
});

describe("Ethereum: ec-secp256k1, keccak256, format eth", () => {
  test("the recovery here works (a self-check with a local key)", () => {
    const { privateKey, publicKey } = crypto.generateKeyPairSync("ec", { namedCurve: "secp256k1" });
    const message = crypto.randomBytes(40);
    const sig = crypto.sign("sha256", message, { key: privateKey, dsaEncoding: "ieee-p1363" });
    const hashed = crypto.createHash("sha256").update(message).digest();
    const r = toBig(sig.subarray(0, 32));
    const s = toBig(sig.subarray(32));
    const want = pointOf(publicKey.export({ format: "pem", type: "spki" }));
    const found = [0, 1].filter((recid) => {
      const q = recover(hashed, r, s, recid);
      return q !== null && q[0] === want[0] && q[1] === want[1];
    });
    assert.equal(found.length, 1);
  });

  test("createKey and keyInfo: type ec-secp256k1, an EIP-55 address per version", async () => {
    assert.equal(info.type, "ec-secp256k1");
    assert.match(info.versions[0].eth_address, /^0x[0-9a-fA-F]{40}$/);
    const again = await client.keyInfo(K1);
    assert.equal(again.versions[0].eth_address, info.versions[0].eth_address);
    const pub = await client.publicKey(K1);
    assert.equal(pub.type, "ec-secp256k1");
    assert.ok(signd.KEY_TYPES.includes("ec-secp256k1"));
  });

  test("a keccak256 digest: 65 bytes r‖s‖v, low s, recovers to the key", async () => {
    const res = await client.sign(K1, { digest: KECCAK_HELLO, hash: "keccak256", format: "eth" });
    assert.equal(res.version, 1);
    const [r, s, v] = parts(res.signature);
    assert.deepEqual(recover(KECCAK_HELLO, r, s, v), pointOf(pem));
  });

  test("a message with hash keccak256 is hashed with Keccak-256 by the daemon", async () => {
    const res = await client.sign(K1, { message: HELLO, hash: "keccak256", format: "eth" });
    const [r, s, v] = parts(res.signature);
    assert.deepEqual(recover(KECCAK_HELLO, r, s, v), pointOf(pem));
  });

  test("verify accepts the eth signature and refuses a changed one", async () => {
    const { signature } = await client.sign(K1, {
      digest: KECCAK_HELLO,
      hash: "keccak256",
      format: "eth",
    });
    const ok = await client.verify(K1, {
      signature,
      digest: KECCAK_HELLO,
      hash: "keccak256",
      format: "eth",
    });
    assert.equal(ok.valid, true);
    const bad = Buffer.from(signature);
    bad[40] ^= 1;
    const no = await client.verify(K1, {
      signature: bad,
      digest: KECCAK_HELLO,
      hash: "keccak256",
      format: "eth",
    });
    assert.equal(no.valid, false);
  });

  test("signBatch with format eth: every item recovers to the key", async () => {
    const digests = [KECCAK_HELLO, crypto.randomBytes(32), crypto.randomBytes(32)];
    const res = await client.signBatch(K1, { digests, hash: "keccak256", format: "eth" });
    assert.equal(res.results.length, 3);
    res.results.forEach((item, i) => {
      assert.ok(item.signature, JSON.stringify(item.error));
      const [r, s, v] = parts(item.signature);
      assert.deepEqual(recover(digests[i], r, s, v), pointOf(pem));
    });
  });

  test("refused: a short digest, keccak256 or eth on a P-256 key", async () => {
    await assert.rejects(
      client.sign(K1, { digest: Buffer.alloc(31), hash: "keccak256", format: "eth" }),
      signd.InvalidDigest,
    );
    await assert.rejects(
      client.sign(P256, { digest: KECCAK_HELLO, hash: "keccak256" }),
      signd.WireError,
    );
    await assert.rejects(
      client.sign(P256, { digest: KECCAK_HELLO, hash: "sha256", format: "eth" }),
      signd.WireError,
    );
  });
});
