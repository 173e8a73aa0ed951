// The Client: one connection (connection.js), many requests in flight on it
// (pipelining), per-call time-outs, and retries of the calls that are safe to
// send again.

import { randomUUID } from "node:crypto";

import { calls } from "./calls.js";
import { Connection, Unsent } from "./connection.js";
import { ClientClosed, ConnectionFailed, RateLimited, RequestTimeout, WireError } from "./errors.js";
import { loadSigningKey } from "./jose.js";
import { DEFAULT_MAX_FRAME, MAX_RESPONSE_FRAME, checkArgs, decodeResult } from "./protocol.js";
import { IDEMPOTENCY_KEY_OPS, IDEMPOTENT_OPS } from "./schema.js";

export const DEFAULT_SOCKET = "/run/signd/signd.sock";
/** Default time-out of a call, all its retries included (milliseconds). */
export const DEFAULT_TIMEOUT = 30_000;
/** Default number of retries after the first attempt. */
export const DEFAULT_RETRIES = 3;
/** Back-off before retry n is n times this (milliseconds). */
export const RETRY_BACKOFF = 50;

/**
 * The socket path: the argument, else $SIGND_SOCKET, else /run/signd/signd.sock.
 * @param {string | null | undefined} [path]
 * @returns {string}
 */
export function resolveSocket(path) {
  return path || process.env.SIGND_SOCKET || DEFAULT_SOCKET;
}

/**
 * @param {number} ms
 * @returns {Promise<void>}
 */
function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/**
 * A signd client. One connection, shared by every call: calls made without
 * awaiting each other are pipelined on it. See README.md.
 */
export class Client {
  /**
   * @param {object} [options]
   * @param {string} [options.socket] socket path; default $SIGND_SOCKET, else /run/signd/signd.sock
   * @param {number} [options.timeout] per call, retries included, in milliseconds (default 30000)
   * @param {number} [options.retries] retries after the first attempt (default 3)
   * @param {number} [options.maxFrame] largest request body sent (the daemon's [limits] max_frame, default 1048576)
   * @param {number} [options.maxResponseFrame] largest response body accepted (default 64 MiB)
   */
  constructor(options = {}) {
    this.socketPath = resolveSocket(options.socket);
    this.timeout = options.timeout ?? DEFAULT_TIMEOUT;
    this.retries = options.retries ?? DEFAULT_RETRIES;
    this.maxFrame = options.maxFrame ?? DEFAULT_MAX_FRAME;
    this.maxResponseFrame = options.maxResponseFrame ?? MAX_RESPONSE_FRAME;
    /** @type {Connection | null} */
    this._conn = null;
    /** @type {Promise<Connection> | null} */
    this._connecting = null;
    /** @type {Set<Promise<unknown>>} */
    this._active = new Set();
    this._closing = false;
    this._closed = false;
  }

  /**
   * A client, connected.
   * @param {ConstructorParameters<typeof Client>[0]} [options]
   * @returns {Promise<Client>}
   */
  static async connect(options) {
    const client = new Client(options);
    await client.connect();
    return client;
  }

  /**
   * Open the connection now (calls open it when needed anyway).
   * @returns {Promise<this>}
   */
  async connect() {
    if (this._closing) throw new ClientClosed("client is closed");
    await this._connection(performance.now() + this.timeout);
    return this;
  }

  /**
   * The open connection, or a new one (a connection that broke is never reused).
   * @param {number} deadline
   * @returns {Promise<Connection>}
   */
  async _connection(deadline) {
    if (this._closed) throw new ClientClosed("client is closed");
    const conn = this._conn;
    if (conn && !conn.dead) return conn;
    this._conn = null;
    if (this._connecting === null) {
      const connecting = Connection.open(
        this.socketPath,
        Math.max(deadline - performance.now(), 1),
        this.maxResponseFrame,
      );
      this._connecting = connecting;
      connecting.then(
        (c) => {
          if (this._connecting === connecting) this._connecting = null;
          if (this._closed) c.destroy();
          else this._conn = c;
        },
        () => {
          if (this._connecting === connecting) this._connecting = null;
        },
      );
    }
    return this._connecting;
  }

  /**
   * Send one operation: the typed methods all come here.
   *
   * @param {string} op wire op name
   * @param {Record<string, unknown>} [args] wire arguments
   * @param {CallOptions} [options]
   * @returns {Promise<any>} the result, as a plain object with the wire field names
   */
  call(op, args = {}, options = {}) {
    if (this._closing) return Promise.reject(new ClientClosed("client is closed"));
    let checked;
    try {
      checked = checkArgs(op, args);
    } catch (exc) {
      return Promise.reject(exc);
    }
    const run = this._run(op, checked, options.timeout ?? this.timeout);
    this._active.add(run);
    const forget = () => this._active.delete(run);
    run.then(forget, forget);
    return run;
  }

  /**
   * @param {string} op
   * @param {Record<string, unknown>} args
   * @param {number} timeout
   */
  async _run(op, args, timeout) {
    if (IDEMPOTENCY_KEY_OPS.has(op) && args.idempotency_key == null) {
      // Made once per call: every retry carries the same key, so a create_key
      // or rotate whose answer was lost is answered again, not done twice.
      args = { ...args, idempotency_key: randomUUID().replaceAll("-", "") };
    }
    const idempotent = IDEMPOTENT_OPS.has(op) || args.idempotency_key != null;
    const deadline = performance.now() + timeout;
    let attempt = 0;
    let freeResend = true;
    for (;;) {
      attempt++;
      /** @type {Connection | null} */
      let conn = null;
      try {
        conn = await this._connection(deadline);
        const resp = await this._exchange(conn, op, args, deadline);
        if (resp.error) throw resp.error;
        return decodeResult(op, /** @type {Record<string, unknown>} */ (resp.result));
      } catch (exc) {
        const err = /** @type {Error} */ (exc);
        if (err instanceof Unsent && freeResend && conn !== null && conn.requests > 1) {
          // A connection that carried earlier requests, closed by the daemon
          // as this one went out (its idle time-out): not a failure and not
          // an attempt. Once, on a new connection.
          attempt--;
          freeResend = false;
          continue;
        }
        const wait = this._retryDelay(err, attempt, idempotent, deadline);
        if (wait === null) throw err instanceof Unsent ? toConnectionFailed(err) : err;
        await sleep(wait);
      }
    }
  }

  /**
   * Milliseconds to wait before retrying, or null: do not retry.
   * @param {Error} err
   * @param {number} attempt
   * @param {boolean} idempotent
   * @param {number} deadline
   * @returns {number | null}
   */
  _retryDelay(err, attempt, idempotent, deadline) {
    if (attempt > this.retries || this._closed) return null;
    let ok;
    if (err instanceof Unsent) ok = true;
    else if (!idempotent) ok = false;
    else if (err instanceof ClientClosed) ok = false;
    else ok = err instanceof ConnectionFailed || (err instanceof WireError && err.retryable);
    if (!ok) return null;
    let wait = RETRY_BACKOFF * attempt;
    if (err instanceof RateLimited && err.retryAfter !== null) {
      wait = Math.max(wait, err.retryAfter * 1000);
    }
    return performance.now() + wait < deadline ? wait : null;
  }

  /**
   * One request on `conn`, waited for until `deadline`.
   * @param {Connection} conn
   * @param {string} op
   * @param {Record<string, unknown>} args
   * @param {number} deadline
   * @returns {Promise<import("./protocol.js").Response>}
   */
  _exchange(conn, op, args, deadline) {
    const { id, answer } = conn.send(op, args, this.maxFrame);
    return new Promise((resolve, reject) => {
      const timer = setTimeout(
        () => {
          conn.abandon(id);
          reject(new RequestTimeout(`no answer to ${op} in time`));
        },
        Math.max(deadline - performance.now(), 0),
      );
      answer.then(
        (r) => {
          clearTimeout(timer);
          resolve(r);
        },
        (e) => {
          clearTimeout(timer);
          reject(e);
        },
      );
    });
  }

  /**
   * Stop taking calls, let the calls in flight finish (or time out), then
   * close the connection. With `{force: true}`, close at once instead: calls
   * in flight fail with ClientClosed. Resolves once the socket is closed.
   * @param {{force?: boolean}} [options]
   * @returns {Promise<void>}
   */
  async close(options = {}) {
    this._closing = true;
    if (options.force) {
      this._closed = true;
    }
    while (!this._closed && this._active.size > 0) {
      await Promise.allSettled([...this._active]);
    }
    this._closed = true;
    const conn = this._conn ?? (await this._connecting?.catch(() => null)) ?? null;
    this._conn = null;
    if (conn) await (options.force ? conn.destroy() : conn.end());
  }

  // ------------------------------------------------------------ operations

  /**
   * Generate a new key on the token.
   * @param {string} name
   * @param {string} type ec-p256, ec-p384, ed25519, rsa-2048, rsa-3072, rsa-4096 or ec-secp256k1
   * @param {Record<string, unknown>} [options] auto_rotate_period, verify_grace, deletion_allowed, max_versions, idempotency_key, backup
   * @param {CallOptions} [callOptions]
   */
  createKey(name, type, options, callOptions) {
    return this.#send(() => calls.createKey(name, type, options), callOptions);
  }

  /** @param {CallOptions} [callOptions] */
  listKeys(callOptions) {
    return this.#send(() => calls.listKeys(), callOptions);
  }

  /**
   * @param {string} name
   * @param {CallOptions} [callOptions]
   */
  keyInfo(name, callOptions) {
    return this.#send(() => calls.keyInfo(name), callOptions);
  }

  /**
   * @param {string} name
   * @param {{version?: number}} [options]
   * @param {CallOptions} [callOptions]
   */
  publicKey(name, options, callOptions) {
    return this.#send(() => calls.publicKey(name, options), callOptions);
  }

  /**
   * A JWK Set of every version of `names` that may still verify.
   * @param {string[]} names
   * @param {CallOptions} [callOptions]
   */
  jwks(names, callOptions) {
    return this.#send(() => calls.jwks(names), callOptions);
  }

  /**
   * Ethereum (an ec-secp256k1 key): `{digest, hash: "keccak256", format: "eth"}` gives
   * 65 bytes r‖s‖v, v the recovery id (0 or 1) and s low.
   * @param {string} name
   * @param {Record<string, unknown>} options message or digest; hash, padding, format, version
   * @param {CallOptions} [callOptions]
   */
  sign(name, options, callOptions) {
    return this.#send(() => calls.sign(name, options), callOptions);
  }

  /**
   * @param {string} name
   * @param {Record<string, unknown>} options messages or digests; hash, padding, format, version
   * @param {CallOptions} [callOptions]
   */
  signBatch(name, options, callOptions) {
    return this.#send(() => calls.signBatch(name, options), callOptions);
  }

  /**
   * @param {string} name
   * @param {Record<string, unknown>} options signature; message or digest; hash, padding, format, version
   * @param {CallOptions} [callOptions]
   */
  verify(name, options, callOptions) {
    return this.#send(() => calls.verify(name, options), callOptions);
  }

  /**
   * @param {string} name
   * @param {{idempotency_key?: string}} [options]
   * @param {CallOptions} [callOptions]
   */
  rotate(name, options, callOptions) {
    return this.#send(() => calls.rotate(name, options), callOptions);
  }

  /**
   * @param {string} name
   * @param {Record<string, unknown>} settings
   * @param {CallOptions} [callOptions]
   */
  updateKey(name, settings, callOptions) {
    return this.#send(() => calls.updateKey(name, settings), callOptions);
  }

  /**
   * @param {string} name
   * @param {number} version
   * @param {CallOptions} [callOptions]
   */
  disable(name, version, callOptions) {
    return this.#send(() => calls.disable(name, version), callOptions);
  }

  /**
   * @param {string} name
   * @param {number} version
   * @param {CallOptions} [callOptions]
   */
  enable(name, version, callOptions) {
    return this.#send(() => calls.enable(name, version), callOptions);
  }

  /**
   * @param {string} name
   * @param {{version?: number, all?: boolean}} options
   * @param {CallOptions} [callOptions]
   */
  destroy(name, options, callOptions) {
    return this.#send(() => calls.destroy(name, options), callOptions);
  }

  /** @param {CallOptions} [callOptions] */
  health(callOptions) {
    return this.#send(() => calls.health(), callOptions);
  }

  /**
   * Who the daemon takes this process to be (uid, gid, groups, user) and the
   * verbs it has on each key: what to look at after a PermissionDenied.
   * @param {CallOptions} [callOptions]
   */
  whoami(callOptions) {
    return this.#send(() => calls.whoami(), callOptions);
  }

  /**
   * A backup bundle of backup-able keys: those named, or (absent) every one
   * (keys made without `backup` are then listed in `skipped`). Needs `admin`
   * on every key in it. Write `bundle` to a file as it is (BACKUP.md).
   * @param {{keys?: string[]}} [options]
   * @param {CallOptions} [callOptions]
   */
  backup(options, callOptions) {
    return this.#send(() => calls.backup(options), callOptions);
  }

  /**
   * Restore one key from a bundle: the bundle's header and the key's entry,
   * each with its MAC (the Python client's signd_client.bundle.restore_calls
   * splits a file into these). With `check: true`, only says what would be
   * done; nothing is written.
   * @param {import("./calls.js").RestoreArgs} args
   * @param {CallOptions} [callOptions]
   */
  restore(args, callOptions) {
    return this.#send(() => calls.restore(args), callOptions);
  }

  /**
   * The token's import key (made on first need) to wrap material under for
   * importKey: algorithm, import_key_id (SHA-256 of public_key, hex) and
   * public_key (SPKI DER). Needs `import` on `name`.
   * @param {string} name
   * @param {CallOptions} [callOptions]
   */
  importParams(name, callOptions) {
    return this.#send(() => calls.importParams(name), callOptions);
  }

  /**
   * Bring existing key material onto the token: wrapped_key (an AES-256 key
   * under RSA-OAEP SHA-1) and wrapped_material (the PKCS#8 or secret under it,
   * AES-KWP), as PROTOCOL.md's import_params describes; public_key (SPKI DER)
   * for EC and RSA. A new key, or with new_version the key's next version.
   * An idempotency_key is made up when none is given.
   * @param {string} name
   * @param {string} type
   * @param {import("./calls.js").ImportKeyOptions} options
   * @param {CallOptions} [callOptions]
   */
  importKey(name, type, options, callOptions) {
    return this.#send(() => calls.importKey(name, type, options), callOptions);
  }

  /**
   * A handle on one version of `name` that signs JWS and JWTs (signJws,
   * signJwt): by default the key's current version, and then it follows
   * rotation; with `{version}`, that version only (pinned). One public_key
   * request.
   * @param {string} name
   * @param {{version?: number | null}} [options]
   * @returns {Promise<import("./jose.js").SigningKey>}
   */
  signingKey(name, options) {
    return loadSigningKey(this, name, options);
  }

  /**
   * @param {() => import("./calls.js").Call} build
   * @param {CallOptions} [callOptions]
   */
  #send(build, callOptions) {
    let c;
    try {
      c = build();
    } catch (exc) {
      return Promise.reject(exc);
    }
    return this.call(c.op, c.args, callOptions);
  }
}

/**
 * @typedef {object} CallOptions
 * @property {number} [timeout] milliseconds, retries included (default: the client's)
 */

/**
 * What the caller sees of an Unsent that could not be retried.
 * @param {Unsent} err
 */
function toConnectionFailed(err) {
  return new ConnectionFailed(err.message, { cause: err.cause });
}
