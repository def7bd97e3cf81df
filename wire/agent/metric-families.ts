/**
 * The families the guest agent's GetMetrics reports (guest/agent/metrics.ts): each one's type,
 * labels and meaning. Part of the wire contract between the agent and the host, so it lives with
 * the protocol and imports nothing: the agent answers with these, the README's list is generated
 * from it, and `kata-runtime monitor` takes the guest families' types from it (a guest cannot
 * retype a family for the other sandboxes).
 */

export const GUEST_METRICS = {
  kata_agent_scrape_count: { type: 'counter', labels: [], help: 'Metrics scrape count.' },
  kata_agent_process_cpu_seconds_total: { type: 'counter', labels: [], help: 'Total user and system CPU time of the agent in seconds.' },
  kata_agent_process_resident_memory_bytes: { type: 'gauge', labels: [], help: 'Resident memory size of the agent in bytes.' },
  kata_agent_process_open_fds: { type: 'gauge', labels: [], help: 'Number of open file descriptors of the agent.' },
  kata_guest_load: { type: 'gauge', labels: ['item'], help: 'Guest system load (/proc/loadavg): item load1, load5, load15.' },
  kata_guest_tasks: { type: 'gauge', labels: ['item'], help: 'Guest tasks (/proc/loadavg): item cur (runnable), max (existing).' },
  kata_guest_meminfo: { type: 'gauge', labels: ['item'], help: 'Guest memory (/proc/meminfo, keys in snake case: mem_total, mem_free, ...) in bytes; page counts as they are.' },
  kata_guest_cpu_time: { type: 'gauge', labels: ['cpu', 'item'], help: 'Guest CPU time (/proc/stat) in seconds: cpu total or its number, item user, nice, system, idle, iowait, irq, softirq, steal, guest, guest_nice.' },
  kata_guest_container_cpu_usage_seconds_total: { type: 'counter', labels: ['container_id'], help: "A container's CPU time from its cgroup (cpu.stat usage_usec) in seconds." },
  kata_guest_container_memory_usage_bytes: { type: 'gauge', labels: ['container_id'], help: "A container's memory use from its cgroup (memory.current) in bytes." },
  kata_guest_container_memory_limit_bytes: { type: 'gauge', labels: ['container_id'], help: "A container's memory limit from its cgroup (memory.max) in bytes; absent when unlimited." },
  kata_guest_container_pids: { type: 'gauge', labels: ['container_id'], help: "The number of processes in a container's cgroup (pids.current)." },
} as const satisfies Record<string, { type: 'gauge' | 'counter'; labels: readonly string[]; help: string }>;
