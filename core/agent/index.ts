/**
 * The kata-agent API subset the runtime uses (generated from protos/kata/*.proto), its client and
 * the transports to reach it.
 */
export { AgentClient, AGENT_TIMEOUTS, connectAgent, type AgentCallOptions, type AgentClientOptions, type ConnectAgentOptions } from './client.js';
export { OomEventLoop, OOM_RETRY_MS, type OomEventLoopOptions } from './oom-events.js';
export { AgentError, AGENT_ERROR_CODES, type AgentErrorKind } from './errors.js';
export { AGENT_VSOCK_PORT, dialAgent, formatAgentAddress, parseAgentAddress, type AgentAddress, type DialOptions } from './transports.js';
export * from '../../wire/agent/proto.gen.js';
