// End to end: the Node client against a real signd, whose socket is
// $SIGND_TEST_SOCKET (tests/test_node_client.py starts one and sets it).
// Signatures are checked by Node's own crypto, independently of the daemon.

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
const EC = `node-ec-${suffix}`;
const ED = `node-ed-${suffix}`;
const RSA = `node-rsa-${suffix}`;
const MSG = Buffer.from("hello, world\n");

/** @type {signd.Client} */
let client;
/** PEM of version 1 of EC */
let ecPem1;
let edPem;

before(async () => {
  client = await signd.Client.connect({ socket: SOCKET });
  const [ec, ed] = await Promise.all([
    client.createKey(EC, "ec-p256"),
    client.createKey(ED, "ed25519"),
  ]);
  ecPem1 = ec.versions[0].public_key_pem;
  edPem = ed.versions[0].public_key_pem;
});

after(async () => {
  await client.close();
});

/** Verify an ECDSA signature with Node's crypto. */
function ecdsaValid(pem, message, signature, { hash = "sha256", raw = false } = {}) {
  return crypto.verify(
    hash,
    message,
    { key: pem, dsaEncoding: raw ? "ieee-p1363" : "der" },
    signature,
  );
}

describe("keys and signatures", () => {
  test("health", async () => {
    const h = await client.health();
    assert.equal(h.status, "ok");
    assert.equal(h.ready, true);
    assert.equal(h.live, true);
    assert.equal(h.protocol_version, 1);
    assert.equal(typeof h.uptime, "number");
    assert.equal(typeof h.token.label, "string");
  });

  test("whoami: this process, as the daemon sees it, and its verbs on a key it uses", async () => {
    await client.sign(EC, { message: MSG }); // it may sign with EC: so "sign" must be listed
    const who = await client.whoami();
    assert.equal(who.uid, process.getuid());
    assert.equal(who.gid, process.getgid());
    assert.ok(who.groups.includes(who.gid));
    assert.deepEqual(who.groups, [...who.groups].sort((a, b) => a - b));
    const names = who.keys.map((k) => k.name);
    assert.deepEqual(names, [...names].sort());
    const ec = who.keys.find((k) => k.name === EC);
    assert.ok(ec, `${EC} (made and used by this process) is listed`);
    assert.ok(ec.verbs.includes("sign"));
    assert.deepEqual(ec.verbs, [...ec.verbs].sort());
  });

  test("create_key answers the full KeyInfo", async () => {
    const info = await client.keyInfo(EC);
    assert.equal(info.name, EC);
    assert.equal(info.type, "ec-p256");
    assert.equal(info.current_version, 1);
    assert.equal(info.versions.length, 1);
    assert.equal(info.versions[0].state, "active");
    assert.match(info.versions[0].public_key_pem, /^-----BEGIN PUBLIC KEY-----\n/);
    assert.equal(info.auto_rotate_period, 0);
    assert.equal(info.deletion_allowed, false);
    const pub = await client.publicKey(ED);
    assert.deepEqual(pub, { name: ED, version: 1, type: "ed25519", public_key_pem: edPem });
    const { keys } = await client.listKeys();
    const names = keys.map((k) => k.name);
    assert.ok(names.includes(EC) && names.includes(ED));
    const summary = keys.find((k) => k.name === ED);
    assert.deepEqual(Object.keys(summary), ["name", "type", "created", "current_version"]);
    assert.deepEqual([summary.type, summary.current_version], ["ed25519", 1]);
    assert.equal(typeof summary.created, "number");
  });

  test("ECDSA P-256: message (DER), raw format and a sha384 digest verify with node:crypto", async () => {
    const der = await client.sign(EC, { message: MSG });
    assert.ok(Buffer.isBuffer(der.signature));
    assert.deepEqual(
      { key: der.key, version: der.version, algorithm: der.algorithm },
      { key: EC, version: 1, algorithm: "ecdsa-p256-sha256" },
    );
    assert.ok(ecdsaValid(ecPem1, MSG, der.signature));

    const raw = await client.sign(EC, { message: MSG, format: "raw" });
    assert.equal(raw.signature.length, 64);
    assert.ok(ecdsaValid(ecPem1, MSG, raw.signature, { raw: true }));

    const digest = crypto.createHash("sha384").update(MSG).digest();
    const pre = await client.sign(EC, { digest, hash: "sha384" });
    assert.equal(pre.algorithm, "ecdsa-p256-sha384");
    assert.ok(ecdsaValid(ecPem1, MSG, pre.signature, { hash: "sha384" }));
  });

  test("Ed25519 signs the message itself", async () => {
    const sig = await client.sign(ED, { message: MSG });
    assert.equal(sig.algorithm, "ed25519");
    assert.equal(sig.signature.length, 64);
    assert.ok(crypto.verify(null, MSG, edPem, sig.signature));
  });

  test("verify: a valid signature, a tampered one, a tampered message", async () => {
    const { signature } = await client.sign(EC, { message: MSG });
    assert.deepEqual(await client.verify(EC, { signature, message: MSG }), {
      valid: true,
      key: EC,
      version: 1,
      algorithm: "ecdsa-p256-sha256",
    });
    const bad = Buffer.from(signature);
    bad[bad.length - 1] ^= 1;
    assert.deepEqual(await client.verify(EC, { signature: bad, message: MSG }), {
      valid: false,
      key: EC,
    });
    const other = await client.verify(EC, { signature, message: Buffer.from("hello, world!\n") });
    assert.equal(other.valid, false);
    const ed = await client.sign(ED, { message: MSG });
    assert.equal((await client.verify(ED, { signature: ed.signature, message: MSG, version: 1 })).valid, true);
  });

  test("sign_batch: messages, and digests with one bad item", async () => {
    const batch = await client.signBatch(ED, { messages: [MSG, Buffer.alloc(0)] });
    assert.equal(batch.algorithm, "ed25519");
    assert.equal(batch.results.length, 2);
    assert.ok(crypto.verify(null, MSG, edPem, batch.results[0].signature));
    assert.ok(crypto.verify(null, Buffer.alloc(0), edPem, batch.results[1].signature));

    const good = crypto.createHash("sha256").update(MSG).digest();
    const res = await client.signBatch(EC, { digests: [good, good.subarray(1)], hash: "sha256" });
    assert.ok(ecdsaValid(ecPem1, MSG, res.results[0].signature));
    assert.equal(res.results[1].signature, undefined);
    assert.equal(res.results[1].error.code, 201);
    assert.equal(res.results[1].error.name, "invalid_digest");
    assert.ok(signd.errorFromWire(res.results[1].error) instanceof signd.InvalidDigest);
  });

  test("RSA-2048: a call that times out leaves the connection usable; create_key replays by idempotency key; PKCS#1 v1.5 and PSS verify", async () => {
    const idem = `node-e2e-${suffix}`;
    // Key generation takes far longer than 1 ms: the client gives up, the
    // daemon carries on, and the late answer is dropped when it comes.
    await assert.rejects(
      client.createKey(RSA, "rsa-2048", { idempotency_key: idem }, { timeout: 1 }),
      signd.RequestTimeout,
    );
    const info = await client.createKey(RSA, "rsa-2048", { idempotency_key: idem });
    assert.equal(info.created_version, 1);
    assert.equal(info.current_version, 1);
    const pem = info.versions[0].public_key_pem;
    assert.equal((await client.health()).status, "ok"); // same connection, still in step

    const p1 = await client.sign(RSA, { message: MSG });
    assert.equal(p1.algorithm, "rsa-pkcs1v15-sha256");
    assert.equal(p1.signature.length, 256);
    assert.ok(crypto.verify("sha256", MSG, pem, p1.signature));

    const pss = await client.sign(RSA, { message: MSG, padding: "pss", hash: "sha512" });
    assert.equal(pss.algorithm, "rsa-pss-sha512");
    assert.ok(
      crypto.verify(
        "sha512",
        MSG,
        { key: pem, padding: crypto.constants.RSA_PKCS1_PSS_PADDING, saltLength: crypto.constants.RSA_PSS_SALTLEN_DIGEST },
        pss.signature,
      ),
    );
  });
});

describe("errors", () => {
  test("unknown key: KeyNotFound", async () => {
    const err = await client.keyInfo(`no-such-${suffix}`).catch((e) => e);
    assert.ok(err instanceof signd.KeyNotFound);
    assert.ok(err instanceof signd.WireError);
    assert.equal(err.code, 300);
    assert.equal(err.name, "key_not_found");
    assert.equal(err.retryable, false);
    await assert.rejects(client.sign(`no-such-${suffix}`, { message: MSG }), signd.KeyNotFound);
  });

  test("bad arguments: InvalidArgument from the daemon", async () => {
    // A digest without its hash, and a key name the daemon refuses.
    await assert.rejects(client.sign(EC, { digest: Buffer.alloc(32) }), (e) => {
      assert.ok(e instanceof signd.InvalidArgument);
      assert.equal(e.code, 200);
      return true;
    });
    await assert.rejects(client.keyInfo("not a valid name!"), signd.InvalidArgument);
    await assert.rejects(client.sign(EC, { digest: Buffer.alloc(31), hash: "sha256" }), signd.InvalidDigest);
    await assert.rejects(client.sign(EC, { message: MSG, hash: "md5" }), signd.UnsupportedAlgorithm);
  });

  test("bad arguments the client refuses before sending", async () => {
    await assert.rejects(client.sign(EC, { message: "text, not bytes" }), signd.InvalidArgument);
    await assert.rejects(client.sign(EC, { message: MSG, salt: 1 }), signd.InvalidArgument);
    await assert.rejects(client.destroy(EC, {}), signd.InvalidArgument);
  });

  test("create_key of a taken name: KeyExists; a missing version: VersionNotFound", async () => {
    await assert.rejects(client.createKey(ED, "ed25519"), signd.KeyExists);
    await assert.rejects(client.publicKey(ED, { version: 99 }), signd.VersionNotFound);
  });

  test("no daemon at the socket: ConnectionFailed", async () => {
    const lost = new signd.Client({ socket: `/tmp/signd-none-${suffix}.sock`, retries: 1 });
    await assert.rejects(lost.health(), signd.ConnectionFailed);
    await lost.close();
  });
});

describe("backup and restore", () => {
  // The session daemon's token has no wrap key, and its keys are made without
  // `backup`: these reach the daemon's checks, and nothing is written.
  test("backup of a key made without backup: InvalidArgument naming it; of a missing key: KeyNotFound", async () => {
    await assert.rejects(client.backup({ keys: [EC] }), (e) => {
      assert.ok(e instanceof signd.InvalidArgument, String(e));
      assert.match(e.message, new RegExp(`${EC}.*not backup-able`));
      return true;
    });
    await assert.rejects(client.backup({ keys: [`no-such-${suffix}`] }), signd.KeyNotFound);
  });

  test("restore of a damaged bundle: InvalidArgument, checked or not; the key stays absent", async () => {
    const name = `node-restored-${suffix}`;
    const junk = Buffer.from("not a bundle header");
    const mac = Buffer.alloc(32);
    const args = { key: name, header: junk, header_mac: mac, entry: junk, entry_mac: mac };
    for (const check of [true, false]) {
      await assert.rejects(client.restore({ ...args, check }), (e) => {
        assert.ok(e instanceof signd.InvalidArgument, String(e));
        assert.match(e.message, /header/);
        return true;
      });
    }
    await assert.rejects(client.keyInfo(name), signd.KeyNotFound);
  });
});

describe("pipelining", () => {
  test("many calls in flight on one connection, answers matched by id", async () => {
    const conn = client._conn;
    const before = conn.requests;
    const messages = Array.from({ length: 200 }, (_, i) => Buffer.from(`message ${i} ${suffix}`));
    const [sigs, infos] = await Promise.all([
      Promise.all(messages.map((message, i) => client.sign(i % 2 ? EC : ED, { message }))),
      Promise.all(Array.from({ length: 50 }, () => client.keyInfo(ED))),
    ]);
    assert.equal(client._conn, conn, "one connection carried them all");
    assert.equal(conn.requests - before, 250);
    sigs.forEach((sig, i) => {
      if (i % 2) assert.ok(ecdsaValid(ecPem1, messages[i], sig.signature), `signature ${i}`);
      else assert.ok(crypto.verify(null, messages[i], edPem, sig.signature), `signature ${i}`);
    });
    assert.ok(infos.every((info) => info.name === ED));
  });
});

describe("rotation, JWKS and the lifecycle", () => {
  test("rotate, then jwks: every verifying version, kid NAME:VERSION, verified with the imported JWK", async () => {
    const old = await client.sign(EC, { message: MSG, format: "raw" });
    const idem = `rotate-${suffix}`;
    const rotated = await client.rotate(EC, { idempotency_key: idem });
    assert.equal(rotated.current_version, 2);
    assert.equal(rotated.created_version, 2);
    assert.deepEqual(
      rotated.versions.map((v) => v.state),
      ["verify-only", "active"],
    );
    // The same idempotency key again: answered again, nothing rotated.
    const again = await client.rotate(EC, { idempotency_key: idem });
    assert.equal(again.current_version, 2);
    assert.equal(again.created_version, 2);
    assert.equal((await client.publicKey(EC, { version: 1 })).public_key_pem, ecPem1);

    const fresh = await client.sign(EC, { message: MSG, format: "raw" });
    assert.equal(fresh.version, 2);
    await assert.rejects(client.sign(EC, { message: MSG, version: 1 }), signd.VersionNotUsable);

    const { keys } = await client.jwks([EC, ED]);
    assert.deepEqual(
      keys.map((k) => k.kid).sort(),
      [`${EC}:1`, `${EC}:2`, `${ED}:1`].sort(),
    );
    const byKid = (kid) => crypto.createPublicKey({ key: keys.find((k) => k.kid === kid), format: "jwk" });
    for (const sig of [old, fresh]) {
      const jwk = keys.find((k) => k.kid === `${sig.key}:${sig.version}`);
      assert.deepEqual([jwk.kty, jwk.crv, jwk.alg, jwk.use], ["EC", "P-256", "ES256", "sig"]);
      assert.ok(
        crypto.verify("sha256", MSG, { key: byKid(jwk.kid), dsaEncoding: "ieee-p1363" }, sig.signature),
      );
    }
    // The JWK and the PEM are the same key.
    assert.equal(
      byKid(`${EC}:1`).export({ format: "pem", type: "spki" }),
      crypto.createPublicKey(ecPem1).export({ format: "pem", type: "spki" }),
    );
    const ed = await client.sign(ED, { message: MSG });
    const edJwk = keys.find((k) => k.kid === `${ED}:1`);
    assert.deepEqual([edJwk.kty, edJwk.crv], ["OKP", "Ed25519"]);
    assert.ok(crypto.verify(null, MSG, byKid(`${ED}:1`), ed.signature));
    await assert.rejects(client.jwks([`no-such-${suffix}`]), signd.KeyNotFound);
  });

  test("update_key, disable, enable, destroy", async () => {
    // After the rotation above: version 1 is verify-only, version 2 active.
    let info = await client.updateKey(EC, { verify_grace: 86400, deletion_allowed: true });
    assert.equal(info.verify_grace, 86400);
    assert.equal(info.deletion_allowed, true);
    assert.equal(typeof info.versions[0].verify_until, "number");

    info = await client.disable(EC, 1);
    assert.equal(info.versions[0].state, "disabled");
    const { signature } = await client.sign(EC, { message: MSG }); // version 2 still signs
    assert.equal((await client.verify(EC, { signature, message: MSG })).version, 2);
    info = await client.enable(EC, 1);
    assert.equal(info.versions[0].state, "verify-only");

    info = await client.destroy(EC, { version: 1 });
    assert.equal(info.versions[0].state, "destroyed");
    await assert.rejects(client.enable(EC, 1), signd.VersionNotUsable);
    await assert.rejects(client.destroy(ED, { all: true }), signd.DeletionNotAllowed);
  });
});

describe("the client itself", () => {
  test("the socket defaults to $SIGND_SOCKET, else /run/signd/signd.sock", async () => {
    const saved = process.env.SIGND_SOCKET;
    try {
      delete process.env.SIGND_SOCKET;
      assert.equal(new signd.Client().socketPath, "/run/signd/signd.sock");
      process.env.SIGND_SOCKET = SOCKET;
      const c = new signd.Client();
      assert.equal(c.socketPath, SOCKET);
      assert.equal((await c.health()).ready, true);
      await c.close();
      assert.equal(new signd.Client({ socket: "/elsewhere.sock" }).socketPath, "/elsewhere.sock");
    } finally {
      if (saved === undefined) delete process.env.SIGND_SOCKET;
      else process.env.SIGND_SOCKET = saved;
    }
  });

  test("close waits for calls in flight, then refuses new ones", async () => {
    const c = await signd.Client.connect({ socket: SOCKET });
    const inFlight = c.sign(ED, { message: MSG });
    await c.close();
    assert.equal((await inFlight).key, ED);
    await assert.rejects(c.health(), signd.ClientClosed);
  });
});
