/**
 * containerd's rule for identifiers (github.com/containerd/containerd pkg/identifiers): letters and
 * digits, optionally joined by single `.`, `_` or `-`, at most 76 characters. containerd applies the
 * same rule to namespaces (namespaces.NamespaceRequired calls identifiers.Validate). Ids become path
 * components (run directories, socket names), so anything else — `..`, `/`, an empty or huge id —
 * is refused before any file or process is touched.
 */
import { KataError } from './errors.js';

export const MAX_IDENTIFIER_LENGTH = 76;
const IDENTIFIER = /^[A-Za-z0-9]+(?:[._-][A-Za-z0-9]+)*$/;

/** How a refused value is quoted: never the whole of a huge one. */
function quote(value: string): string {
  const shown = value.length > 80 ? `${value.slice(0, 80)}… (${value.length} characters)` : value;
  return JSON.stringify(shown);
}

/** Why `value` is not a containerd identifier, or undefined when it is one. */
export function identifierProblem(value: string): string | undefined {
  if (value.length === 0) return 'must not be empty';
  if (value.length > MAX_IDENTIFIER_LENGTH) return `is longer than ${MAX_IDENTIFIER_LENGTH} characters`;
  if (!IDENTIFIER.test(value)) return 'must be letters and digits joined by single ".", "_" or "-"';
  return undefined;
}

/**
 * Throws KATA_ERR_INVALID_ID unless `value` is a containerd identifier. `key` names where the value
 * came from: `-id`, `-namespace`, `io.kubernetes.cri.sandbox-id`, `Create.id`, `Exec.exec_id` …
 */
export function checkIdentifier(key: string, value: string): string {
  const problem = identifierProblem(value);
  if (problem) throw new KataError('KATA_ERR_INVALID_ID', `${key} ${quote(value)} ${problem}`, { key, value: value.length > 80 ? `${value.slice(0, 80)}…` : value });
  return value;
}
