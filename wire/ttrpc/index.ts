/**
 * ttrpc, containerd's small RPC protocol (protobuf messages in 10-byte-header frames over any byte
 * stream), as kata-agent and containerd shims speak it. Unary calls only: no shim or Kata API
 * streams.
 */
export { GrpcCode, grpcCodeName, type GrpcCodeName, type GrpcCodeValue } from './codes.js';
export { TtrpcError, isTtrpcError } from './errors.js';
export { FrameBudget, FrameDecoder, encodeFrame, Flags, HEADER_LENGTH, MAX_MESSAGE_LENGTH, MessageType, type DecodedItem, type Frame, type FrameHeader } from './frame.js';
export { TtrpcClient, type CallOptions, type ServiceClient, type TtrpcClientOptions } from './client.js';
export { DEFAULT_SERVER_LIMITS, TtrpcServer, type CallContext, type ServerLimits, type ServerStats, type RawHandler, type RegisterOptions, type ServerConnection, type ServiceImpl, type TtrpcServerOptions } from './server.js';
export type { MessageCodec, MessageInit, MethodDescriptor, RequestOf, ResponseOf, ServiceDescriptor } from './codec.js';
