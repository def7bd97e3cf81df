/** What Health.Version and GetGuestDetails report. */
export const AGENT_VERSION = '0.1.0-kata-ts';
/** kata-agent's API_VERSION: the version of the gRPC protocol it speaks. */
export const API_VERSION = '0.0.1';
