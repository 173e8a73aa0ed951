// signd-client: a Node.js client for signd (see README.md and PROTOCOL.md).

export { Client, DEFAULT_SOCKET, DEFAULT_RETRIES, DEFAULT_TIMEOUT, resolveSocket } from "./client.js";
export * from "./errors.js";
export { JWS_ALGORITHMS, SigningKey, defaultAlgorithm, signJws, signJwt } from "./jose.js";
export {
  DEFAULT_MAX_FRAME,
  FrameReader,
  KEY_TYPES,
  MAX_BATCH,
  MAX_JWKS_KEYS,
  MAX_RESPONSE_FRAME,
  PROTOCOL_VERSION,
  checkArgs,
  decodeResponse,
  decodeResult,
  encodeRequest,
} from "./protocol.js";
export { IDEMPOTENCY_KEY_OPS, IDEMPOTENT_OPS, OPS, RETRY } from "./schema.js";
export { METHODS, calls } from "./calls.js";
