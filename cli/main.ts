/**
 * `kata-runtime`: argument parsing and dispatch. Each subcommand lives in its own module and is
 * imported only when used, so `--version` or `validate` do not pay for the others.
 *
 * Exit codes: 0 success, 1 the command ran and found a problem (invalid configuration, host cannot
 * run it, error), 2 usage error; `run` has its own (see {@link RUN_EXIT}).
 */
import { parseArgs, type ParseArgsConfig } from 'node:util';
import { KataError, isKataError, toKataError } from '../core/errors.js';
import { createLogger, LOG_LEVELS, type LogLevel, type Logger } from '../core/logger.js';
import { defaultConfigPaths, locateConfig, type LocatedConfig } from '../core/config/locate.js';
import { runtimeVersion } from '../core/version.js';
import type { PluginSource } from '../core/plugin-api.js';
import { useBuiltinPlugins } from '../core/plugin-loader.js';
import { PACKAGE_ROOT } from '../core/paths.js';
import { errorReport } from '../core/validate-report.js';
import { describeCause, describeError, problemsOf, processIO, toJson, type CliIO } from './io.js';

export const EXIT = Object.freeze({ OK: 0, FAILED: 1, USAGE: 2 });

/**
 * `run`'s exit statuses besides the process's own (0-255, 128+n when killed by signal n), as
 * docker and podman use them: 125 the runtime failed (the coded error says why), 126 the command
 * cannot be executed, 127 the command was not found. An interrupted run (SIGINT, SIGTERM, SIGHUP)
 * exits 128+n, as shells report it; usage errors exit 2 as for every command.
 */
export const RUN_EXIT = Object.freeze({ RUNTIME_FAILED: 125, CANNOT_EXECUTE: 126, NOT_FOUND: 127 });

const OPTIONS = {
  config: { type: 'string' },
  'kata-config': { type: 'string' },
  'log-level': { type: 'string' },
  debug: { type: 'boolean' },
  json: { type: 'boolean' },
  version: { type: 'boolean', short: 'v' },
  help: { type: 'boolean', short: 'h' },
  'show-default-config-paths': { type: 'boolean' },
  'kata-show-default-config-paths': { type: 'boolean' },
  // run
  rootfs: { type: 'string' },
  interactive: { type: 'boolean', short: 'i' },
  tty: { type: 'boolean', short: 't' },
  timings: { type: 'boolean' },
  netns: { type: 'string' },
  // cleanup
  'dry-run': { type: 'boolean' },
  // monitor
  listen: { type: 'string' },
} satisfies ParseArgsConfig['options'];

export type CliFlags = {
  config?: string | undefined;
  json: boolean;
  rootfs?: string | undefined;
  interactive: boolean;
  tty: boolean;
  timings: boolean;
  netns?: string | undefined;
  dryRun: boolean;
  listen?: string | undefined;
};

/** What a subcommand receives. */
export interface CommandContext {
  readonly io: CliIO;
  readonly log: Logger;
  readonly flags: CliFlags;
  readonly args: readonly string[];
  /** Finds the configuration file (--config, KATA_CONF_FILE, default paths) and logs which one. */
  locate(): LocatedConfig;
}

type Command = (ctx: CommandContext) => Promise<number>;

const COMMANDS: Record<string, { summary: string; load: () => Promise<Command> }> = {
  validate: { summary: 'run the validated config phase and explain its decisions [--json]', load: async () => (await import('./validate.js')).validateCommand },
  env: { summary: 'show the configuration, runtime, hypervisor, agent and host [--json]', load: async () => (await import('./env.js')).envCommand },
  check: { summary: 'check that this host can run the configuration [--json]', load: async () => (await import('./check.js')).checkCommand },
  run: {
    summary: 'run CMD in a container in a new VM: run [--rootfs PATH] [--netns PATH] [-i] [-t] [--timings] -- CMD [ARG...]',
    load: async () => {
      const { runCommand } = await import('./run.js');
      return (ctx) => runCommand(ctx, ctx.flags);
    },
  },
  exec: { summary: "attach to the sandbox's guest debug console (debug_console_enabled): exec <sandbox-id>; Ctrl-] detaches", load: async () => (await import('./exec.js')).execCommand },
  factory: { summary: 'the VM template ([factory] enable_template): factory init | status | destroy [--json]', load: async () => (await import('./factory.js')).factoryCommand },
  cleanup: { summary: 'remove the run directories of runs and shims that were killed (never a live one) [--dry-run] [--json]', load: async () => (await import('./cleanup.js')).cleanupCommand },
  monitor: { summary: "serve every sandbox's Prometheus metrics with sandbox labels (kata-monitor) [--listen HOST:PORT]", load: async () => (await import('./monitor.js')).monitorCommand },
  version: { summary: 'print the runtime version', load: async () => versionCommand },
};
const ALIASES: Record<string, string> = { 'kata-env': 'env', 'kata-check': 'check' };

/**
 * With --json, what a command that stopped before its report (no configuration, unparsable file,
 * unsupported hypervisor …) prints on stdout: its report's shape with nothing found, `valid: false`
 * and the error as `problems[]`, as `validate --json` lists problems.
 */
const JSON_ERROR_REPORT: Record<string, Record<string, unknown>> = {
  check: { hypervisor: '', capable: false, checks: [] },
  env: {},
};

function aliasesOf(name: string): string {
  const a = Object.entries(ALIASES).filter(([, to]) => to === name).map(([from]) => from);
  return a.length === 0 ? '' : ` (alias: ${a.join(', ')}, as in Kata)`;
}

const USAGE = `Usage: kata-runtime [global options] <command> [command options]

Commands:
${Object.entries(COMMANDS).map(([n, c]) => `  ${n.padEnd(10)} ${c.summary}${aliasesOf(n)}`).join('\n')}

Global options:
  --config, --kata-config FILE    configuration file (else KATA_CONF_FILE, else the default paths)
  --show-default-config-paths     print the default configuration paths, /etc first
  --log-level LEVEL               ${LOG_LEVELS.join('|')} (default warn; logs go to stderr)
  --debug                         same as --log-level debug
  --json                          machine-readable output (validate, env, check, cleanup, factory)
  --rootfs PATH, -i, --timings    run: the container rootfs (block device, image file or directory),
                                  connect stdin, print the time of each phase
  --netns PATH                    run: the network namespace whose interfaces the VM mirrors
  --dry-run                       cleanup: list what would be removed, remove nothing
  --listen HOST:PORT              monitor: where to serve /metrics (default 127.0.0.1:8090)
  -v, --version                   print the version
  -h, --help                      print this help
`;

/**
 * Runs one `kata-runtime` command line. `builtins` are the built-in plugins the executable hands
 * over (bin/kata-runtime.ts passes plugins/builtin.ts's list; the CLI itself imports no plugin).
 */
export async function main(argv: readonly string[], io: CliIO = processIO, opts: { builtins?: readonly PluginSource[] } = {}): Promise<number> {
  if (opts.builtins) useBuiltinPlugins(opts.builtins);
  // Everything after `--` belongs to the command being run, options included.
  const dashDash = argv.indexOf('--');
  const own = dashDash < 0 ? [...argv] : argv.slice(0, dashDash);
  const passthrough = dashDash < 0 ? [] : argv.slice(dashDash + 1);
  let parsed: ReturnType<typeof parseArgs<{ options: typeof OPTIONS; allowPositionals: true; strict: true }>>;
  try {
    parsed = parseArgs({ args: own, options: OPTIONS, allowPositionals: true, strict: true });
  } catch (e) {
    io.err(`kata-runtime: ${e instanceof Error ? e.message : String(e)}\n\n${USAGE}`);
    return EXIT.USAGE;
  }
  const v = parsed.values;
  if (v.help) {
    io.out(USAGE);
    return EXIT.OK;
  }
  if (v.version) return versionCommand({ io } as CommandContext);
  if (v['show-default-config-paths'] || v['kata-show-default-config-paths']) {
    io.out(defaultConfigPaths(io.env).join('\n') + '\n');
    return EXIT.OK;
  }
  const level = v.debug ? 'debug' : (v['log-level'] ?? 'warn');
  if (!LOG_LEVELS.includes(level as LogLevel)) {
    io.err(`kata-runtime: unknown log level "${level}" (use one of ${LOG_LEVELS.join(', ')})\n`);
    return EXIT.USAGE;
  }
  const [name, ...positionalArgs] = parsed.positionals;
  const args = [...positionalArgs, ...passthrough];
  if (!name) {
    io.err(`kata-runtime: no command given\n\n${USAGE}`);
    return EXIT.USAGE;
  }
  const command = COMMANDS[ALIASES[name] ?? name];
  if (!command) {
    io.err(`kata-runtime: unknown command "${name}"\n\n${USAGE}`);
    return EXIT.USAGE;
  }
  const log = createLogger({ level: level as LogLevel, stacks: level === 'debug' || level === 'trace', ...(io === processIO ? {} : { stream: { write: (line: string) => io.err(line) } }) });
  const flags: CliFlags = {
    config: v.config ?? v['kata-config'],
    json: v.json ?? false,
    rootfs: v.rootfs,
    interactive: v.interactive ?? false,
    tty: v.tty ?? false,
    timings: v.timings ?? false,
    netns: v.netns,
    dryRun: v['dry-run'] ?? false,
    listen: v.listen,
  };
  let configPath: string | null = null;
  const ctx: CommandContext = {
    io,
    log,
    flags,
    args,
    locate() {
      const located = locateConfig({ flag: flags.config, env: io.env });
      configPath = located.path;
      log.info({ path: located.path, source: located.source }, 'using configuration file');
      return located;
    },
  };
  try {
    return await (await command.load())(ctx);
  } catch (e) {
    const err = isKataError(e) ? e : toKataError(e);
    if (err.code === 'KATA_ERR_INTERNAL') log.error({ err: e }, 'internal error');
    // A tool that asked for JSON gets its one object even when the command stopped early.
    const canonical = ALIASES[name] ?? name;
    if (flags.json && canonical === 'validate') io.out(toJson(errorReport(err, configPath)) + '\n');
    else if (flags.json && canonical in JSON_ERROR_REPORT) io.out(toJson({ valid: false, configPath, ...JSON_ERROR_REPORT[canonical], problems: problemsOf(err) }) + '\n');
    io.err(describeError(err));
    if (level === 'debug' || level === 'trace') io.err(describeCause(err, PACKAGE_ROOT));
    if (err.code === 'KATA_ERR_USAGE') return EXIT.USAGE;
    return canonical === 'run' ? RUN_EXIT.RUNTIME_FAILED : EXIT.FAILED;
  }
}

async function versionCommand(ctx: Pick<CommandContext, 'io'>): Promise<number> {
  const { PLUGIN_API_VERSION } = await import('../core/plugin-api.js');
  ctx.io.out(`kata-runtime  : ${runtimeVersion()}\n   plugin API : ${PLUGIN_API_VERSION}\n`);
  return EXIT.OK;
}

/** For commands: a usage error with the command's own message. */
export function usageError(message: string): KataError {
  return new KataError('KATA_ERR_USAGE', message);
}
