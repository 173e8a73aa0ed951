// One Unix-socket connection to signd: frames out, frames in, answers matched
// to requests by id, and what a broken connection means for each request in
// flight (Unsent: surely not read by the daemon). The Client's retries are in
// client.js.

import net from "node:net";

import {
  ClientClosed,
  ConnectionFailed,
  FrameTooLarge,
  ProtocolViolation,
  RequestTimeout,
  SigndError,
  WireError,
} from "./errors.js";
import { FrameReader, decodeResponse, encodeRequest } from "./protocol.js";

/**
 * The connection broke before the daemon had read the request whole, so it
 * was not carried out: its send failed, or the daemon reset the connection
 * (closed it with our bytes unread, as its idle close does) before any byte
 * arrived after the request went out. Any request may be sent again.
 */
export class Unsent extends ConnectionFailed {}

/**
 * @typedef {object} Pending
 * @property {(r: import("./protocol.js").Response) => void} resolve
 * @property {(e: Error) => void} reject
 * @property {number} rxAtSend bytes received on the connection when the request was written
 * @property {boolean} writeFailed
 * @property {boolean} alone no other request was in flight when it was sent
 */

/** One socket: frames out, frames in, answers matched to requests by id. */
export class Connection {
  /**
   * @param {net.Socket} socket connected
   * @param {number} maxResponseFrame
   */
  constructor(socket, maxResponseFrame) {
    this.socket = socket;
    this.reader = new FrameReader(maxResponseFrame);
    this.nextId = 1;
    /** requests written on it so far */
    this.requests = 0;
    /** bytes received so far */
    this.rx = 0;
    /** @type {Map<number, Pending>} */
    this.pending = new Map();
    /** ids whose caller gave up (time-out): their late answers are dropped. @type {Set<number>} */
    this.abandoned = new Set();
    /** @type {Error | null} why it is no longer usable */
    this.dead = null;
    /** @type {NodeJS.ErrnoException | null} */
    this.socketError = null;
    /** @type {Promise<void>} */
    this.closed = new Promise((resolve) => socket.once("close", () => resolve()));

    socket.on("data", (chunk) => this.#onData(chunk));
    socket.on("error", (err) => {
      this.socketError = err;
    });
    socket.on("end", () => {
      this.#fail(new ConnectionFailed("signd closed the connection"));
    });
    socket.on("close", () => {
      const err = this.socketError;
      this.#fail(
        new ConnectionFailed(
          err ? `connection to signd broke: ${err.code ?? err.message}` : "connection to signd closed",
          { cause: err ?? undefined },
        ),
      );
    });
    socket.unref(); // idle: do not keep the process alive
  }

  /**
   * Open a connection to `path`.
   * @param {string} path
   * @param {number} timeout milliseconds
   * @param {number} maxResponseFrame
   * @returns {Promise<Connection>}
   */
  static open(path, timeout, maxResponseFrame) {
    return new Promise((resolve, reject) => {
      const socket = net.createConnection({ path });
      const timer = setTimeout(() => {
        socket.destroy();
        reject(new RequestTimeout(`connecting to ${path} timed out`));
      }, timeout);
      socket.once("connect", () => {
        clearTimeout(timer);
        socket.removeAllListeners("error");
        resolve(new Connection(socket, maxResponseFrame));
      });
      socket.once("error", (/** @type {NodeJS.ErrnoException} */ err) => {
        clearTimeout(timer);
        reject(
          new ConnectionFailed(`cannot connect to signd at ${path}: ${err.code ?? err.message}`, {
            cause: err,
          }),
        );
      });
    });
  }

  /**
   * Write one request; the promise settles with its answer.
   * @param {string} op
   * @param {Record<string, unknown>} args
   * @param {number} maxFrame
   * @returns {{id: number, answer: Promise<import("./protocol.js").Response>}}
   * @throws {FrameTooLarge} the request is larger than maxFrame (nothing was sent)
   */
  send(op, args, maxFrame) {
    if (this.dead) throw new Unsent("the connection closed before the request was sent");
    const id = this.nextId++;
    const frame = encodeRequest(id, op, args);
    if (frame.length - 4 > maxFrame) {
      throw new FrameTooLarge(
        `${op} request of ${frame.length - 4} bytes exceeds the frame limit of ${maxFrame} bytes`,
      );
    }
    this.requests++;
    /** @type {Pending} */
    let pending;
    const answer = new Promise((resolve, reject) => {
      pending = {
        resolve,
        reject,
        rxAtSend: this.rx,
        writeFailed: false,
        alone: this.pending.size === 0,
      };
    });
    // @ts-ignore assigned in the executor above
    this.pending.set(id, pending);
    this.socket.ref();
    this.socket.write(frame, (err) => {
      if (err) {
        // Not all of the frame went out: the daemon cannot have read it.
        pending.writeFailed = true;
        this.socketError ??= /** @type {NodeJS.ErrnoException} */ (err);
        this.socket.destroy();
      } else {
        pending.rxAtSend = this.rx;
      }
    });
    return { id, answer };
  }

  /**
   * The caller no longer waits for `id` (its time-out): drop its answer when it comes.
   * @param {number} id
   */
  abandon(id) {
    if (this.pending.delete(id)) {
      this.abandoned.add(id);
      this.#idle();
    }
  }

  /** No request in flight: let the process exit if nothing else runs. */
  #idle() {
    if (this.pending.size === 0) this.socket.unref();
  }

  /** @param {Buffer} chunk */
  #onData(chunk) {
    this.rx += chunk.length;
    this.reader.push(chunk);
    try {
      for (const body of this.reader.frames()) {
        const resp = decodeResponse(body);
        if (resp.id === null) {
          // A connection-level error: it belongs to no request, so every
          // request outstanding here fails with it (or is retried).
          this.#fail(/** @type {WireError} */ (resp.error));
          this.socket.destroy();
          return;
        }
        const id = /** @type {number} */ (resp.id);
        const p = this.pending.get(id);
        if (p === undefined) {
          if (this.abandoned.delete(id)) continue;
          throw new ProtocolViolation(`answer to unknown request id ${resp.id}`);
        }
        this.pending.delete(id);
        this.#idle();
        p.resolve(resp);
      }
    } catch (exc) {
      const err =
        exc instanceof SigndError ? exc : new ProtocolViolation(String(/** @type {Error} */ (exc)));
      this.#fail(err);
      this.socket.destroy();
    }
  }

  /**
   * Mark the connection unusable and fail every request still waiting on it.
   * @param {Error} err
   */
  #fail(err) {
    this.dead ??= err;
    const reset = this.socketError?.code === "ECONNRESET" || this.socketError?.code === "EPIPE";
    for (const [id, p] of this.pending) {
      this.pending.delete(id);
      // A reset means the daemon closed with bytes of ours unread; it closes a
      // connection with requests unread when it was idle (nothing in flight),
      // so a request sent on an idle connection, with no byte received
      // since, was not read. With others in flight, a reset proves nothing.
      const unread = reset && err instanceof ConnectionFailed && p.alone && p.rxAtSend === this.rx;
      if (p.writeFailed || unread) {
        p.reject(new Unsent(`signd closed the connection unread: ${this.socketError?.code}`));
      } else {
        p.reject(err);
      }
    }
  }

  /** Close after the answers in flight, gracefully. */
  end() {
    this.dead ??= new ClientClosed("client is closed");
    this.socket.ref(); // until it has closed
    this.socket.end();
    return this.closed;
  }

  destroy() {
    this.#fail(new ClientClosed("client is closed"));
    this.socket.destroy();
    return this.closed;
  }
}
