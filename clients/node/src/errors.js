// signd's errors: one class per wire error code, plus the local ones.
//
// Every error that travels on the wire has a stable numeric `code`, a stable
// snake_case `name` and a `retryable` flag (PROTOCOL.md, "Errors"). The client
// raises the class of the code it receives, so a caller catches the same class
// whether the daemon or the client found the problem. Errors that never travel
// on the wire (a broken connection, the client's own time-out, a daemon that
// breaks the protocol) derive from LocalError and have no wire code.

/** Base of every error this package throws. */
export class SigndError extends Error {
  /**
   * @param {string} message
   * @param {{cause?: unknown}} [options]
   */
  constructor(message, options) {
    super(message, options);
    /** @type {string} */
    this.name = new.target.name;
  }
}

/** An error found on this side of the socket; it has no wire code. */
export class LocalError extends SigndError {
  /** @type {null} */
  get code() {
    return null;
  }

  /** Local errors are not wire errors; retrying is decided by the client. */
  get retryable() {
    return false;
  }
}

/** The daemon's socket could not be reached, or the connection broke. */
export class ConnectionFailed extends LocalError {}

/** No answer arrived within the call's time-out. */
export class RequestTimeout extends LocalError {}

/** The daemon sent something the protocol does not allow. */
export class ProtocolViolation extends LocalError {}

/** The client was closed; no more calls can be made with it. */
export class ClientClosed extends ConnectionFailed {}

/**
 * An error with a stable code that travels on the wire.
 *
 * `name` is the wire name (e.g. `key_not_found`), `message` the daemon's
 * sentence for humans (do not parse it).
 */
export class WireError extends SigndError {
  /** @type {number} */
  static code = 0;
  /** @type {string} */
  static wireName = "";
  /** @type {boolean} */
  static retryable = false;

  /** @param {string} message */
  constructor(message) {
    super(message);
    const cls = /** @type {typeof WireError} */ (new.target);
    /** @type {number} */
    this.code = cls.code;
    /** @type {string} the wire name, e.g. `key_not_found` */
    this.name = cls.wireName;
    /** @type {boolean} true when the same request may succeed if sent again later */
    this.retryable = cls.retryable;
  }

  toString() {
    return `${this.name} (error ${this.code}): ${this.message}`;
  }
}

/**
 * @param {number} code
 * @param {string} wireName
 * @param {boolean} retryable
 * @returns {typeof WireError}
 */
function wireClass(code, wireName, retryable) {
  return class extends WireError {
    static code = code;
    static wireName = wireName;
    static retryable = retryable;
  };
}

// Each class is declared on its own so that its JavaScript name is the
// PascalCase name (KeyNotFound.name === "KeyNotFound").

/** 100: the frame's body is not one msgpack map with str keys. */
export class MalformedFrame extends wireClass(100, "malformed_frame", false) {}
/** 101: a frame is larger than the limit; the daemon closes the connection. */
export class FrameTooLarge extends wireClass(101, "frame_too_large", false) {}
/** 102: `v` is not the int 1. */
export class UnsupportedVersion extends wireClass(102, "unsupported_version", false) {}
/** 103: `op` names no operation. */
export class UnknownOperation extends wireClass(103, "unknown_operation", false) {}
/** 104: the envelope is wrong. */
export class InvalidRequest extends wireClass(104, "invalid_request", false) {}
/** 200: an argument is missing, unknown, mistyped or not allowed. */
export class InvalidArgument extends wireClass(200, "invalid_argument", false) {}
/** 201: the digest is not as long as its hash requires. */
export class InvalidDigest extends wireClass(201, "invalid_digest", false) {}
/** 202: unknown key type or hash, or one the token cannot do. */
export class UnsupportedAlgorithm extends wireClass(202, "unsupported_algorithm", false) {}
/** 300: no key of that name. */
export class KeyNotFound extends wireClass(300, "key_not_found", false) {}
/** 301: the key has no such version. */
export class VersionNotFound extends wireClass(301, "version_not_found", false) {}
/** 302: create_key with a name already taken. */
export class KeyExists extends wireClass(302, "key_exists", false) {}
/** 303: the version's state forbids the operation. */
export class VersionNotUsable extends wireClass(303, "version_not_usable", false) {}
/**
 * 304: destroy on a key whose deletion_allowed is false; or rotate on a key at
 * its max_versions when no version may be pruned.
 */
export class DeletionNotAllowed extends wireClass(304, "deletion_not_allowed", false) {}
/** 305: another process changed the same key at the same moment; nothing was changed. */
export class Conflict extends wireClass(305, "conflict", true) {}
/** 306: a watermarked key's position at or below its mark; never retried (it may be signed). */
export class PositionUsed extends wireClass(306, "position_used", false) {}
/** 400: this peer may not do this operation on this key. */
export class PermissionDenied extends wireClass(400, "permission_denied", false) {}
/** 401: over a rate limit; `retryAfter` says when (seconds). */
export class RateLimited extends wireClass(401, "rate_limited", true) {
  /**
   * @param {string} message
   * @param {number | null} [retryAfter] seconds, from the error map's `retry_after`
   */
  constructor(message, retryAfter = null) {
    super(message);
    /** @type {number | null} */
    this.retryAfter = retryAfter;
  }
}
/** 500: a bug in signd; details are in its log. */
export class InternalError extends wireClass(500, "internal_error", false) {}
/** 501: the token cannot be reached now. */
export class TokenUnavailable extends wireClass(501, "token_unavailable", true) {}
/** 502: the token refused or failed the operation. */
export class TokenError extends wireClass(502, "token_error", false) {}
/** 503: the daemon's queues are full, or it has too many connections. */
export class Busy extends wireClass(503, "busy", true) {}
/** 504: the daemon is stopping. */
export class ShuttingDown extends wireClass(504, "shutting_down", true) {}
/** 505: the daemon could not finish the request within its request_timeout. */
export class DeadlineExceeded extends wireClass(505, "deadline_exceeded", true) {}

/**
 * A code this client does not know (a newer daemon): kept, reported, not retried.
 */
export class UnknownWireError extends WireError {
  /**
   * @param {number} code
   * @param {string} name
   * @param {string} message
   */
  constructor(code, name, message) {
    super(message);
    this.code = code;
    this.name = name;
    this.retryable = false;
  }
}

/** Every wire error class, by code. */
export const ERROR_CLASSES = Object.freeze(
  /** @type {Record<number, typeof WireError>} */ (
    Object.fromEntries(
      [
        MalformedFrame,
        FrameTooLarge,
        UnsupportedVersion,
        UnknownOperation,
        InvalidRequest,
        InvalidArgument,
        InvalidDigest,
        UnsupportedAlgorithm,
        KeyNotFound,
        VersionNotFound,
        KeyExists,
        VersionNotUsable,
        DeletionNotAllowed,
        Conflict,
        PositionUsed,
        PermissionDenied,
        RateLimited,
        InternalError,
        TokenUnavailable,
        TokenError,
        Busy,
        ShuttingDown,
        DeadlineExceeded,
      ].map((cls) => [cls.code, cls]),
    )
  ),
);

/**
 * The error for a wire error map `{code, name, message[, retry_after]}`.
 *
 * @param {{code: number, name: string, message: string, retry_after?: number}} info
 * @returns {WireError}
 */
export function errorFromWire(info) {
  const cls = ERROR_CLASSES[info.code];
  if (cls === undefined) {
    return new UnknownWireError(info.code, info.name, info.message);
  }
  if (cls === RateLimited) {
    return new RateLimited(info.message, info.retry_after ?? null);
  }
  return new cls(info.message);
}
