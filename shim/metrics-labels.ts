/**
 * The shim's side of its metrics that the task service needs without loading prom-client: what
 * the metrics read of a sandbox, and the pod's CRI labels (shim/metrics.ts renders them).
 */

/** The CRI labels of the pod, from the annotations of its sandbox container, when it has them. */
export const CRI_LABEL_ANNOTATIONS = {
  cri_name: 'io.kubernetes.cri.sandbox-name',
  cri_namespace: 'io.kubernetes.cri.sandbox-namespace',
  cri_uid: 'io.kubernetes.cri.sandbox-uid',
} as const;

/** What the metrics read of the sandbox; each part may be missing (no sandbox yet, a test). */
export interface SandboxFigures {
  /** The hypervisor's pid (the VM handle's), when it runs. */
  hypervisorPid(): number | undefined;
  /** Seconds per start phase (core/sandbox.ts startPhases). */
  startPhases(): Readonly<Record<string, number>>;
  /** The agent's GetMetrics answer. */
  guestMetrics(opts: { timeoutMs: number }): Promise<string>;
  /** CRI labels of the pod (`cri_name`, `cri_namespace`, `cri_uid`) where known. */
  podLabels(): Readonly<Record<string, string>>;
}

/** The pod's CRI labels from the sandbox container's annotations (only those present). */
export function podLabelsFrom(annotations: Readonly<Record<string, string>>): Record<string, string> {
  const out: Record<string, string> = {};
  for (const [label, key] of Object.entries(CRI_LABEL_ANNOTATIONS)) {
    const v = annotations[key];
    if (v) out[label] = v.slice(0, 256);
  }
  return out;
}
