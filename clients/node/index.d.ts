// Type declarations for signd-client (hand-written; the package is plain JavaScript).
// Field names are the wire names of PROTOCOL.md.

/// <reference types="node" />

// ------------------------------------------------------------------ options

export interface ClientOptions {
  /** Socket path; default $SIGND_SOCKET, else /run/signd/signd.sock. */
  socket?: string;
  /** Time-out of one call, its retries included, in milliseconds (default 30000). */
  timeout?: number;
  /** Retries after the first attempt (default 3). */
  retries?: number;
  /** Largest request body sent: the daemon's [limits] max_frame (default 1048576). */
  maxFrame?: number;
  /** Largest response body accepted (default 64 MiB). */
  maxResponseFrame?: number;
}

export interface CallOptions {
  /** Milliseconds, retries included (default: the client's). */
  timeout?: number;
}

export type KeyType =
  | "ec-p256"
  | "ec-p384"
  | "ed25519"
  | "rsa-2048"
  | "rsa-3072"
  | "rsa-4096"
  /** ECDSA on secp256k1 (Ethereum, Bitcoin). */
  | "ec-secp256k1"
  /** HMAC secrets (API request signing): `sign` answers the MAC, `verify` checks it on the token. */
  | "hmac-sha256"
  | "hmac-sha384"
  | "hmac-sha512";
/** `keccak256` (Ethereum's Keccak-256, not SHA3-256) only with `ec-secp256k1` keys. */
export type Hash = "sha256" | "sha384" | "sha512" | "keccak256";
export type Padding = "pkcs1v15" | "pss";
/**
 * ECDSA signature encodings: `der` (default), `raw` (r‖s, 64 bytes on 256-bit curves),
 * `eth` (`ec-secp256k1` only: 65 bytes r‖s‖v, v the recovery id 0 or 1, s low;
 * add 27 for an Ethereum message signature, chainId * 2 + 35 for an EIP-155 transaction).
 */
export type SignatureFormat = "der" | "raw" | "eth";

export interface KeySettings {
  /** Seconds between automatic rotations; 0 = off. Always sent as a float. */
  auto_rotate_period?: number;
  /** Seconds an older version keeps verifying after the next one was created; 0 = no limit. */
  verify_grace?: number;
  /** Also lets the daemon destroy retired versions by itself. */
  deletion_allowed?: boolean;
  /** Most versions not destroyed the key may hold; 0 = the daemon's default. */
  max_versions?: number;
}

export interface CreateKeyOptions extends KeySettings {
  /** 1 to 128 printable ASCII characters; the client makes one up per call when absent. */
  idempotency_key?: string;
  /** Its private keys may be exported wrapped under the token's wrap key; absent: the daemon's default. */
  backup?: boolean;
  /** Every sign must carry a position above the key's mark (replay protection). */
  watermark?: boolean;
}

export interface UpdateKeyOptions extends KeySettings {
  min_sign_version?: number;
  min_verify_version?: number;
  /** A watermarked key: raise its mark to this position (never lowered). */
  raise_mark?: number | bigint;
}

export interface SignOptions {
  /** The data to sign (exactly one of message and digest). */
  message?: Uint8Array;
  /** A precomputed hash (needs `hash`; not for Ed25519). */
  digest?: Uint8Array;
  hash?: Hash;
  padding?: Padding;
  format?: SignatureFormat;
  version?: number;
  /** A watermarked key: the position signed, above its mark (uint64). */
  position?: number | bigint;
}

export interface SignBatchOptions {
  messages?: Uint8Array[];
  digests?: Uint8Array[];
  hash?: Hash;
  padding?: Padding;
  format?: SignatureFormat;
  version?: number;
  /** A watermarked key: the first item's position; the others follow by one. */
  position?: number | bigint;
}

export interface VerifyOptions extends Omit<SignOptions, "position"> {
  signature: Uint8Array;
  /** A replay-checked verify (with nonce): Unix seconds. */
  timestamp?: number | bigint;
  /** A replay-checked verify (with timestamp): 8 to 64 bytes. */
  nonce?: Uint8Array;
}

export type DestroyOptions = { version: number; all?: false } | { all: true; version?: undefined };

export interface BackupOptions {
  /** The keys to back up; absent: every backup-able key (the others are listed in `skipped`). */
  keys?: string[];
}

/** One key's entry from a backup bundle and the bundle's header, each with its MAC (BACKUP.md). */
export interface RestoreArgs {
  /** The entry's key (the policy is checked on it). */
  key: string;
  header: Uint8Array;
  /** 32 bytes. */
  header_mac: Uint8Array;
  entry: Uint8Array;
  /** 32 bytes. */
  entry_mac: Uint8Array;
  /** true: check the MACs and answer what would be done; nothing is written. */
  check?: boolean;
}

/** Key material wrapped under the token's import key (PROTOCOL.md, import_params). */
export interface ImportKeyOptions {
  import_key_id: string;
  /** An AES-256 key under RSA-OAEP (SHA-1, MGF1-SHA1) with the import key. */
  wrapped_key: Uint8Array;
  /** The PKCS#8 DER (or HMAC secret) under that key, AES key wrap with padding. */
  wrapped_material: Uint8Array;
  /** SubjectPublicKeyInfo DER of the private key (EC and RSA). */
  public_key?: Uint8Array;
  /** true: the next version of the existing key (it keeps its settings). */
  new_version?: boolean;
  auto_rotate_period?: number;
  verify_grace?: number;
  deletion_allowed?: boolean;
  max_versions?: number;
  backup?: boolean;
  idempotency_key?: string;
}

// ------------------------------------------------------------------ results

export type VersionState = "active" | "verify-only" | "retired" | "disabled" | "destroyed";

export interface VersionInfo {
  version: number;
  state: VersionState | string;
  created: number;
  /** Absent for an HMAC key (a secret has no public part). */
  public_key_pem?: string;
  verify_until?: number;
  /** `ec-secp256k1` keys: the version's Ethereum address (EIP-55 checksummed). */
  eth_address?: string;
}

export interface KeyInfo {
  name: string;
  type: KeyType | string;
  created: number;
  current_version: number;
  versions: VersionInfo[];
  /** The settings are absent when an older daemon (without the key lifecycle) answers. */
  auto_rotate_period?: number;
  verify_grace?: number;
  min_sign_version?: number;
  min_verify_version?: number;
  deletion_allowed?: boolean;
  next_rotation?: number;
  /** In answers to create_key and rotate: the version the request made. */
  created_version?: number;
  /** Most versions not destroyed the key may hold (its own or the daemon's default). */
  max_versions?: number;
  /** true: its private keys can be exported wrapped under the token's wrap key (backup). */
  backup?: boolean;
  /** true: every sign carries a position above `mark`. */
  watermark?: boolean;
  /** A watermarked key's highest position signed. */
  mark?: number | bigint;
}

export interface KeySummary {
  name: string;
  type: KeyType | string;
  created: number;
  current_version: number;
}

export interface KeyList {
  keys: KeySummary[];
}

export interface PublicKey {
  name: string;
  version: number;
  type: KeyType | string;
  public_key_pem: string;
}

/** A JSON Web Key (RFC 7517/7518/8037); binary members are base64url without padding. */
export interface Jwk {
  kty: "EC" | "OKP" | "RSA" | string;
  /** NAME:VERSION */
  kid: string;
  use: string;
  alg?: string;
  crv?: string;
  x?: string;
  y?: string;
  n?: string;
  e?: string;
  /** Members a later daemon may add are kept. */
  [member: string]: unknown;
}

export interface Jwks {
  keys: Jwk[];
}

export interface SignResult {
  signature: Buffer;
  key: string;
  version: number;
  algorithm: string;
}

export interface ErrorInfo {
  code: number;
  name: string;
  message: string;
}

export interface BatchItem {
  signature?: Buffer;
  error?: ErrorInfo;
}

export interface SignBatchResult {
  key: string;
  version: number;
  algorithm: string;
  results: BatchItem[];
}

export interface VerifyResult {
  valid: boolean;
  key: string;
  version?: number;
  algorithm?: string;
  /** A replay-checked verify: valid, invalid, replayed or stale. */
  status?: "valid" | "invalid" | "replayed" | "stale" | string;
}

export interface TokenStatus {
  label: string;
  manufacturer: string;
  model: string;
  serial: string;
  logged_in: boolean;
  /** The token profile signd drives it with: softhsm, yubihsm or generic. */
  profile?: string;
  /** Key types the token can make and sign with, read from its mechanisms. */
  key_types?: string[];
  /** The token's mechanisms, as CKM_ names. */
  mechanisms?: string[];
  /** With several tokens (`Health.tokens`): serving, catching_up or unavailable. */
  state?: "serving" | "catching_up" | "unavailable" | string;
}

export interface Health {
  status: "ok" | "degraded" | "unavailable" | string;
  live: boolean;
  ready: boolean;
  daemon_version: string;
  protocol_version: number;
  uptime: number;
  keys: number;
  token?: TokenStatus;
  detail?: string;
  /** The audit log's chain head (to a peer that may read `signd.audit`). */
  audit?: AuditHead;
  /** With several tokens: each one, in config order, with its state. */
  tokens?: TokenStatus[];
}

/** One key the caller may use, and how. */
export interface KeyGrant {
  name: string;
  /** Sorted; among "admin", "create", "read", "rotate", "sign", "verify". */
  verbs: string[];
}

/** Who the daemon takes the caller to be, and every key it has a verb on (sorted by name). */
export interface Whoami {
  uid: number;
  gid: number;
  /** Sorted, the primary gid included. */
  groups: number[];
  /** Absent when the uid has no user name. */
  user?: string;
  keys: KeyGrant[];
}

/** A backup bundle, to be written to a file as it is. */
export interface BackupResult {
  bundle: Buffer;
  /** The keys in it, sorted. */
  keys: string[];
  /** How many versions they hold (destroyed versions too, as public keys). */
  versions: number;
  /** Keys left out because they are not backup-able (when no `keys` were named). */
  skipped: string[];
}

/** The import key to wrap material under for importKey. */
export interface ImportParamsResult {
  /** "rsa-oaep-sha1+aes-kwp" */
  algorithm: string;
  /** SHA-256 of public_key, hex. */
  import_key_id: string;
  /** The import key (RSA-3072), SubjectPublicKeyInfo DER. */
  public_key: Uint8Array;
}

/** What a restore did (or, with `check`, would do) to one key. */
export interface RestoreResult {
  key: string;
  /** created: the key was not on the token; updated: older versions only were; unchanged: nothing written. */
  outcome: "created" | "updated" | "unchanged" | string;
  /** The versions put on the token (or that would be). */
  restored: number[];
  /** The bundle's versions the token held already. */
  present: number[];
}

export interface AuditHead {
  chain: string;
  seq: number;
  hash: string;
  file: string;
  time: number;
}

// ------------------------------------------------------------------- client

export declare const DEFAULT_SOCKET: "/run/signd/signd.sock";
export declare const DEFAULT_TIMEOUT: number;
export declare const DEFAULT_RETRIES: number;
export declare function resolveSocket(path?: string | null): string;

export declare class Client {
  constructor(options?: ClientOptions);
  /** A client with its connection open. */
  static connect(options?: ClientOptions): Promise<Client>;
  readonly socketPath: string;
  timeout: number;
  retries: number;
  maxFrame: number;
  maxResponseFrame: number;
  /** Open the connection now (calls open it when needed anyway). */
  connect(): Promise<this>;
  /**
   * Stop taking calls, let those in flight finish, then close the connection;
   * with `force`, close at once (calls in flight fail with ClientClosed).
   */
  close(options?: { force?: boolean }): Promise<void>;
  /** Any operation by its wire name, with its wire arguments. */
  call(op: string, args?: Record<string, unknown>, options?: CallOptions): Promise<any>;

  createKey(name: string, type: KeyType, options?: CreateKeyOptions, callOptions?: CallOptions): Promise<KeyInfo>;
  listKeys(callOptions?: CallOptions): Promise<KeyList>;
  keyInfo(name: string, callOptions?: CallOptions): Promise<KeyInfo>;
  publicKey(name: string, options?: { version?: number }, callOptions?: CallOptions): Promise<PublicKey>;
  jwks(names: string[], callOptions?: CallOptions): Promise<Jwks>;
  sign(name: string, options: SignOptions, callOptions?: CallOptions): Promise<SignResult>;
  signBatch(name: string, options: SignBatchOptions, callOptions?: CallOptions): Promise<SignBatchResult>;
  verify(name: string, options: VerifyOptions, callOptions?: CallOptions): Promise<VerifyResult>;
  rotate(name: string, options?: { idempotency_key?: string }, callOptions?: CallOptions): Promise<KeyInfo>;
  updateKey(name: string, settings: UpdateKeyOptions, callOptions?: CallOptions): Promise<KeyInfo>;
  disable(name: string, version: number, callOptions?: CallOptions): Promise<KeyInfo>;
  enable(name: string, version: number, callOptions?: CallOptions): Promise<KeyInfo>;
  destroy(name: string, options: DestroyOptions, callOptions?: CallOptions): Promise<KeyInfo>;
  health(callOptions?: CallOptions): Promise<Health>;
  /** Who the daemon takes this process to be, and its verbs per key (after a PermissionDenied). */
  whoami(callOptions?: CallOptions): Promise<Whoami>;
  /** A backup bundle of backup-able keys (needs `admin` on each); write `bundle` to a file as it is. */
  backup(options?: BackupOptions, callOptions?: CallOptions): Promise<BackupResult>;
  /** Restore one key from a bundle's entry; with `check: true`, only say what would be done. */
  restore(args: RestoreArgs, callOptions?: CallOptions): Promise<RestoreResult>;
  /** The token's import key (needs `import` on `name`). */
  importParams(name: string, callOptions?: CallOptions): Promise<ImportParamsResult>;
  /** Bring wrapped key material onto the token, as a new key or its next version. */
  importKey(
    name: string,
    type: string,
    options: ImportKeyOptions,
    callOptions?: CallOptions,
  ): Promise<KeyInfo>;
  /**
   * A handle on one version of `name` for signJws/signJwt (one public_key request).
   * Without `version`: the key's current version, and the handle follows rotation.
   * With `version`: that version only (`pinned`).
   */
  signingKey(name: string, options?: { version?: number | null }): Promise<SigningKey>;
}

// -------------------------------------------------------------- JWS and JWT

export type JwsAlgorithmName =
  | "ES256"
  | "ES384"
  | "ES256K"
  | "EdDSA"
  | "RS256"
  | "RS384"
  | "RS512"
  | "PS256"
  | "PS384"
  | "PS512";

/** What signd signs with for a JWS `alg` (RFC 7518 section 3.1, RFC 8037). */
export interface JwsAlgorithm {
  /** The signd key types that sign with it. */
  readonly keyTypes: readonly KeyType[];
  /** null: EdDSA, which signs the message itself. */
  readonly hash: Hash | null;
  readonly padding: Padding | null;
  /** "raw" (r||s) for ES*, the form JWS wants. */
  readonly format: "raw" | null;
}

export declare const JWS_ALGORITHMS: Readonly<Record<JwsAlgorithmName, JwsAlgorithm>>;

/** ES256 (ec-p256), ES384 (ec-p384), ES256K (ec-secp256k1), EdDSA (ed25519), else RS256 (RSA). */
export declare function defaultAlgorithm(keyType: KeyType | string): JwsAlgorithmName;

/**
 * One version of a key on the token, for signing JWS and JWTs; from
 * `client.signingKey(name, {version})`. The private key stays on the token.
 */
export declare class SigningKey {
  private constructor();
  readonly client: Client;
  readonly name: string;
  /** The version this handle signs with (a handle that followed a rotation keeps it; see signJws). */
  readonly version: number;
  readonly type: KeyType | string;
  /** true: made with an explicit version, never moves; false: follows rotation. */
  readonly pinned: boolean;
  /** The version's public key. */
  readonly publicKey: import("node:crypto").KeyObject;
  /** `NAME:VERSION`: the kid of this version's JWK and of every JWS it signs. */
  readonly kid: string;
  /** A new, unpinned handle for the key's current version. Rejects with ProtocolViolation if the key changed type. */
  latest(): Promise<SigningKey>;
}

export interface JwsOptions {
  /** Added to the protected header. `alg` and `kid` come from the key: giving another value throws. */
  headers?: Record<string, unknown>;
  /** Default: defaultAlgorithm(key.type). RSA keys also take RS384/RS512/PS256/PS384/PS512. */
  algorithm?: JwsAlgorithmName;
}

/**
 * A compact JWS (`header.payload.signature`) of `payload` (bytes, or a string as
 * UTF-8), with `alg` and `kid` (`NAME:VERSION`) in the protected header.
 *
 * Throws a TypeError (code ERR_INVALID_ARG_VALUE), nothing sent, for an algorithm that
 * does not fit the key type or is unknown, or a header that sets `alg`/`kid` otherwise.
 * A handle made without a version moves on to the key's current version (once per
 * call, remembered for the next calls) when its version may no longer sign; a pinned
 * one rejects with VersionNotUsable.
 */
export declare function signJws(key: SigningKey, payload: Uint8Array | string, options?: JwsOptions): Promise<string>;

/** A JWT: `claims` (a JSON object) as a compact JWS with `typ: "JWT"` (see signJws). */
export declare function signJwt(key: SigningKey, claims: Record<string, unknown>, options?: JwsOptions): Promise<string>;

// ------------------------------------------------------------------- errors

export declare class SigndError extends Error {
  constructor(message: string, options?: { cause?: unknown });
}

/** Found on this side of the socket; no wire code. */
export declare class LocalError extends SigndError {
  readonly code: null;
  readonly retryable: false;
}
export declare class ConnectionFailed extends LocalError {}
export declare class ClientClosed extends ConnectionFailed {}
export declare class RequestTimeout extends LocalError {}
export declare class ProtocolViolation extends LocalError {}

/** An error with a stable wire code; `name` is the wire name, e.g. "key_not_found". */
export declare class WireError extends SigndError {
  static readonly code: number;
  static readonly wireName: string;
  static readonly retryable: boolean;
  constructor(message: string);
  code: number;
  name: string;
  retryable: boolean;
}

export declare class MalformedFrame extends WireError {}
export declare class FrameTooLarge extends WireError {}
export declare class UnsupportedVersion extends WireError {}
export declare class UnknownOperation extends WireError {}
export declare class InvalidRequest extends WireError {}
export declare class InvalidArgument extends WireError {}
export declare class InvalidDigest extends WireError {}
export declare class UnsupportedAlgorithm extends WireError {}
export declare class KeyNotFound extends WireError {}
export declare class VersionNotFound extends WireError {}
export declare class KeyExists extends WireError {}
export declare class VersionNotUsable extends WireError {}
export declare class DeletionNotAllowed extends WireError {}
export declare class Conflict extends WireError {}
export declare class PositionUsed extends WireError {}
export declare class PermissionDenied extends WireError {}
export declare class RateLimited extends WireError {
  constructor(message: string, retryAfter?: number | null);
  /** Seconds until enough budget is there (the error map's retry_after). */
  retryAfter: number | null;
}
export declare class InternalError extends WireError {}
export declare class TokenUnavailable extends WireError {}
export declare class TokenError extends WireError {}
export declare class Busy extends WireError {}
export declare class ShuttingDown extends WireError {}
export declare class DeadlineExceeded extends WireError {}
/** A code this client does not know (a newer daemon); never retried. */
export declare class UnknownWireError extends WireError {
  constructor(code: number, name: string, message: string);
}

export declare const ERROR_CLASSES: Readonly<Record<number, typeof WireError>>;
export declare function errorFromWire(info: {
  code: number;
  name: string;
  message: string;
  retry_after?: number;
}): WireError;

// ------------------------------------------------------------- wire format

export interface Call {
  op: string;
  /** Wire arguments, in wire order, absent fields left out. */
  args: Record<string, unknown>;
}

export interface Response {
  /** The request's id; null: a connection-level error. */
  id: number | bigint | null;
  result: Record<string, unknown> | null;
  error: WireError | null;
}

export declare const PROTOCOL_VERSION: 1;
export declare const DEFAULT_MAX_FRAME: number;
export declare const MAX_RESPONSE_FRAME: number;
export declare const MAX_BATCH: number;
export declare const MAX_JWKS_KEYS: number;
export declare const KEY_TYPES: readonly KeyType[];
export declare const OPS: readonly string[];
export declare const METHODS: Readonly<Record<string, string>>;
/** When an op may be sent again: "safe" always, "with_key" with an idempotency_key, "never". */
export declare const RETRY: Readonly<Record<string, "safe" | "with_key" | "never">>;
export declare const IDEMPOTENT_OPS: ReadonlySet<string>;
export declare const IDEMPOTENCY_KEY_OPS: ReadonlySet<string>;

/** Request builders: what each Client method sends. */
export declare const calls: {
  createKey(name: string, type: KeyType, options?: CreateKeyOptions): Call;
  listKeys(): Call;
  keyInfo(name: string): Call;
  publicKey(name: string, options?: { version?: number }): Call;
  jwks(names: string[]): Call;
  sign(name: string, options: SignOptions): Call;
  signBatch(name: string, options: SignBatchOptions): Call;
  verify(name: string, options: VerifyOptions): Call;
  rotate(name: string, options?: { idempotency_key?: string }): Call;
  updateKey(name: string, settings: UpdateKeyOptions): Call;
  disable(name: string, version: number): Call;
  enable(name: string, version: number): Call;
  destroy(name: string, options: DestroyOptions): Call;
  health(): Call;
  whoami(): Call;
  backup(options?: BackupOptions): Call;
  restore(args: RestoreArgs): Call;
  importParams(name: string): Call;
  importKey(name: string, type: string, options: ImportKeyOptions): Call;
};

/** Check wire arguments against the op and put them in wire order. Throws InvalidArgument. */
export declare function checkArgs(op: string, args: Record<string, unknown>): Record<string, unknown>;
/** A request's whole frame: 4-byte big-endian length, then the msgpack body. */
export declare function encodeRequest(id: number | bigint, op: string, args: Record<string, unknown>): Buffer;
/** One response body, decoded. Throws ProtocolViolation. */
export declare function decodeResponse(body: Uint8Array): Response;
/** A result checked against its op: wire field names, unknown fields left out. */
export declare function decodeResult(op: string, result: Record<string, unknown>): Record<string, unknown>;

/** Splits a byte stream into frame bodies. */
export declare class FrameReader {
  constructor(maxFrame?: number);
  readonly maxFrame: number;
  readonly buffered: number;
  push(chunk: Uint8Array): void;
  frames(): Generator<Buffer>;
}
