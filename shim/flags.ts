/**
 * The shim's command line, as containerd writes it (Go `flag` syntax: `-name value`, `-name=value`,
 * `--name value`; booleans as `-debug` or `-debug=true`), followed by an optional action:
 *
 *   containerd-shim-kata-v2 -namespace NS -address A -publish-binary B -id ID [-bundle DIR] [-debug] start
 *   containerd-shim-kata-v2 -namespace NS -address A -publish-binary B -id ID -bundle DIR delete
 *   containerd-shim-kata-v2 ... -socket PATH      (the daemon `start` spawns: serve on PATH)
 *   containerd-shim-kata-v2 -v | -version
 *   containerd-shim-kata-v2 -info              (containerd 2.x: RuntimeInfo protobuf on stdout)
 *
 * -id and -namespace must be containerd identifiers (./identifiers.ts): KATA_ERR_INVALID_ID otherwise.
 */
import { KataError } from '../core/errors.js';
import { checkIdentifier } from './identifiers.js';

export type ShimAction = 'start' | 'delete' | 'serve' | 'version' | 'info';

export interface ShimFlags {
  readonly action: ShimAction;
  readonly namespace: string;
  /** containerd's gRPC socket (`-address`). */
  readonly address: string;
  readonly publishBinary: string;
  readonly id: string;
  /** Absent from `start`: the bundle is the working directory then. */
  readonly bundle: string | undefined;
  readonly debug: boolean;
  /** Daemon only: the unix socket to serve the task API on. */
  readonly socket: string | undefined;
}

const STRING_FLAGS = { namespace: 'namespace', address: 'address', 'publish-binary': 'publishBinary', id: 'id', bundle: 'bundle', socket: 'socket' } as const;
const BOOL_FLAGS = new Set(['debug', 'v', 'version', 'info']);
const ACTIONS = new Set(['start', 'delete']);

function usage(message: string): KataError {
  return new KataError('KATA_ERR_SHIM', message, {
    fix: 'containerd starts this program (runtime type io.containerd.kata.v2); by hand: containerd-shim-kata-v2 -namespace NS -address SOCK -id ID [-bundle DIR] start|delete',
  });
}

export function parseShimFlags(argv: readonly string[]): ShimFlags {
  const values: Partial<Record<(typeof STRING_FLAGS)[keyof typeof STRING_FLAGS], string>> = {};
  const bools = new Set<string>();
  const positional: string[] = [];
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i]!;
    if (positional.length > 0 || !arg.startsWith('-') || arg === '-') {
      positional.push(arg);
      continue;
    }
    if (arg === '--') {
      positional.push(...argv.slice(i + 1));
      break;
    }
    const body = arg.replace(/^--?/, '');
    const eq = body.indexOf('=');
    const name = eq < 0 ? body : body.slice(0, eq);
    const inline = eq < 0 ? undefined : body.slice(eq + 1);
    if (BOOL_FLAGS.has(name)) {
      if (inline === undefined || /^(1|t|true)$/i.test(inline)) bools.add(name);
      else if (!/^(0|f|false)$/i.test(inline)) throw usage(`flag -${name} takes a boolean, not "${inline}"`);
      continue;
    }
    const key = STRING_FLAGS[name as keyof typeof STRING_FLAGS];
    if (!key) throw usage(`unknown flag -${name}`);
    const value = inline ?? argv[++i];
    if (value === undefined) throw usage(`flag -${name} needs a value`);
    values[key] = value;
  }
  if (positional.length > 1) throw usage(`one action at most, got: ${positional.join(' ')}`);
  const verb = positional[0];
  if (verb !== undefined && !ACTIONS.has(verb)) throw usage(`unknown action "${verb}" (expected start or delete)`);
  const commandLike = bools.has('info') ? 'info' : bools.has('v') || bools.has('version') ? 'version' : undefined;
  if (commandLike) return { action: commandLike, namespace: '', address: '', publishBinary: '', id: '', bundle: undefined, debug: false, socket: undefined };

  const action: ShimAction = verb === 'start' ? 'start' : verb === 'delete' ? 'delete' : 'serve';
  if (action === 'serve' && !values.socket) throw usage('no action given: expected start or delete');
  const missing = (['namespace', 'id'] as const).filter((k) => !values[k]);
  if (missing.length > 0) throw usage(`missing ${missing.map((m) => `-${m}`).join(' and ')}`);
  // Both become path components (run directory, socket name): refused here, before any action.
  checkIdentifier('-namespace', values.namespace!);
  checkIdentifier('-id', values.id!);
  return {
    action,
    namespace: values.namespace!,
    address: values.address ?? '',
    publishBinary: values.publishBinary ?? '',
    id: values.id!,
    bundle: values.bundle,
    debug: bools.has('debug'),
    socket: values.socket,
  };
}
