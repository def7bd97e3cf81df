/**
 * Coded errors. Every error the runtime raises on purpose carries a `code` from {@link ERROR_CODES};
 * the table is the single source for the README's error table (a test keeps them in step).
 *
 * The plugin on whose behalf an error is raised is a field (`plugin`), and `message` is formatted
 * from it as `[plugin x] text`, in the manner of rollup/vite, so that a log line alone tells whose
 * decision it was; `text` is the message without that prefix, for code that words its own message
 * around another error's. Nothing parses the prefix back out.
 *
 * Plugins may raise codes of their own: `<NAME>_ERR_<WHAT>`, where `<NAME>` is the plugin's name
 * in upper snake case (`my-policy` → `MY_POLICY_ERR_TOO_BIG`). `KATA_ERR_*` is reserved for the
 * runtime's table below. A code the table does not know is shown as it is, with the fix the
 * plugin gave (or a pointer to the plugin's documentation).
 */

export interface ErrorCodeInfo {
  /** What went wrong, in one line. */
  readonly meaning: string;
  /** What the user can do about it. */
  readonly fix: string;
}

export const ERROR_CODES = Object.freeze({
  KATA_ERR_USAGE: {
    meaning: 'The command line is not understood (unknown flag or subcommand, missing argument).',
    fix: 'Run `kata-runtime --help` and correct the command line.',
  },
  KATA_ERR_CONFIG_NOT_FOUND: {
    meaning: 'No configuration file exists at any of the places looked at.',
    fix: 'Install a configuration at /etc/kata-containers/configuration.toml, or name one with --config or KATA_CONF_FILE.',
  },
  KATA_ERR_CONFIG_READ: {
    meaning: 'The configuration file exists but cannot be read.',
    fix: 'Check the file permissions and that the path is a regular file.',
  },
  KATA_ERR_CONFIG_TOO_LARGE: {
    meaning: 'The configuration file is larger than 1 MiB (Kata\'s own are about 30 KB); it is refused before it is read.',
    fix: 'Name the right file (not a log, an image or a device); a real configuration is a few dozen kilobytes.',
  },
  KATA_ERR_CONFIG_PARSE: {
    meaning: 'The configuration file is not valid TOML.',
    fix: 'Correct the TOML syntax at the line and column given.',
  },
  KATA_ERR_CONFIG_TABLE_ARRAY: {
    meaning: 'A section Kata\'s format defines as one table ([hypervisor.<name>], [agent.<name>], [runtime], [factory]) is written as an array of tables ([[...]]).',
    fix: 'Write the section header with single brackets, e.g. [hypervisor.qemu] instead of [[hypervisor.qemu]].',
  },
  KATA_ERR_CONFIG_NO_HYPERVISOR: {
    meaning: 'The configuration has no [hypervisor.<name>] section.',
    fix: 'Add exactly one hypervisor section, e.g. [hypervisor.qemu] or [hypervisor.clh].',
  },
  KATA_ERR_CONFIG_MULTIPLE_HYPERVISORS: {
    meaning: 'The configuration has more than one [hypervisor.<name>] section.',
    fix: 'Keep exactly one hypervisor section; use one configuration file per hypervisor.',
  },
  KATA_ERR_HYPERVISOR_UNSUPPORTED: {
    meaning: 'The hypervisor section names a hypervisor for which no plugin exists.',
    fix: 'Use one of the hypervisors a plugin provides (see the error text), or load a third-party plugin that provides it.',
  },
  KATA_ERR_TEE_UNSUPPORTED: {
    meaning: 'The configuration asks for a confidential-computing technology no plugin provides (e.g. SEV-SNP).',
    fix: 'Use Intel TDX (confidential_guest = true without other TEE keys), or load a plugin that provides this TEE.',
  },
  KATA_ERR_CONFIG_SCHEMA: {
    meaning: 'A configuration value has the wrong type or is out of range.',
    fix: 'Correct each key listed; the text after the key says what is expected.',
  },
  KATA_ERR_CONFIG_VALUE: {
    meaning: 'A configuration value is not allowed, alone or together with another key (a Kata value rule).',
    fix: 'Apply the fix given for the key.',
  },
  KATA_ERR_CONFIG_VETO: {
    meaning: 'A plugin refused a configuration value during the validated config phase.',
    fix: 'Apply the fix given by the plugin, or disable the feature that plugin serves.',
  },
  KATA_ERR_CAPABILITY_MISSING: {
    meaning: 'A plugin requires a capability that no loaded plugin provides for this configuration.',
    fix: 'Change the configuration so the hypervisor offers the capability (the error names the key), or drop the plugin that needs it.',
  },
  KATA_ERR_CONFIG_INVALID: {
    meaning: 'The configuration failed validation; the error lists every problem found (each with its own code).',
    fix: 'Correct every problem listed, then run `kata-runtime validate` again.',
  },
  KATA_ERR_PLUGIN_NOT_FOUND: {
    meaning: 'A plugin named in the configuration cannot be imported (no such file or package).',
    fix: "Give an absolute path to an ES module, a path starting with ./ or ../ (resolved against the configuration file's directory), or the name of a package installed next to kata-ts, in [runtime] plugins.",
  },
  KATA_ERR_PLUGIN_IMPORT: {
    meaning: 'A plugin module was found but threw while being imported.',
    fix: 'Fix the plugin module; run with --debug to see the cause with its file and line.',
  },
  KATA_ERR_PLUGIN_NO_DEFAULT_EXPORT: {
    meaning: 'A plugin module has no default export.',
    fix: 'Export the plugin as `export default definePlugin({ manifest, apply })`.',
  },
  KATA_ERR_PLUGIN_BAD_MANIFEST: {
    meaning: 'A plugin manifest is missing fields or has fields of the wrong type.',
    fix: 'Give the manifest a name, a semver version, a runtime range, provides/requires lists, and an apply() function.',
  },
  KATA_ERR_PLUGIN_API_VERSION: {
    meaning: "The plugin's supported runtime API range does not include this runtime's plugin API version.",
    fix: "Upgrade the plugin, or widen its manifest's `runtime` range after checking it works with this API.",
  },
  KATA_ERR_PLUGIN_MISSING_DEPENDENCY: {
    meaning: 'A plugin requires something (a role such as "hypervisor") that no loaded plugin provides.',
    fix: 'Load a plugin that provides it, or remove the plugin that requires it.',
  },
  KATA_ERR_PLUGIN_DUPLICATE: {
    meaning: 'Two plugins have the same name.',
    fix: 'Remove one of them from [runtime] plugins; built-in plugin names cannot be reused.',
  },
  KATA_ERR_PLUGIN_APPLY: {
    meaning: "A plugin's apply() threw while registering its hooks.",
    fix: "Fix the plugin's apply() (it only taps hooks); run with --debug to see the cause with the plugin's own stack frames.",
  },
  KATA_ERR_PLUGIN_HOOK: {
    meaning: 'A plugin threw inside one of its hook handlers.',
    fix: "Fix the plugin (the error names the plugin and hook); run with --debug to see the cause with the plugin's own stack frames.",
  },
  KATA_ERR_PLUGIN_BAD_VETO: {
    meaning: 'A plugin vetoed a configuration without saying which key, why, or what to change (a veto needs `key`, `reason` and `fix`, each a non-empty string).',
    fix: 'Fix the plugin (the error names the plugin, the hook and what the veto lacks): pass verdict.veto({ key, value, reason, fix }).',
  },
  KATA_ERR_PLUGIN_TAP: {
    meaning: 'A plugin tried to tap a hook under another name, or a hook that does not exist.',
    fix: 'Tap hooks with the plugin\'s own name (or no name) and only hooks listed in the hook table.',
  },
  KATA_ERR_PLUGIN_SCHEMA: {
    meaning: "A plugin's configuration schema cannot be loaded or compiled.",
    fix: 'Fix the JSON Schema the plugin manifest points to.',
  },
  KATA_ERR_VM_START: {
    meaning: 'The hypervisor could not be started, or exited before the VM was up (missing binary, bad kernel path, refused option).',
    fix: "Read the hypervisor's own error in the message (its last stderr lines), and run `kata-runtime check` for this configuration.",
  },
  KATA_ERR_VM_EXITED: {
    meaning: 'The hypervisor process ended while the sandbox was running, without being asked to.',
    fix: "Read the hypervisor's last stderr lines in the message; the sandbox must be recreated.",
  },
  KATA_ERR_VM_STOP: {
    meaning: 'The VM did not stop gracefully and had to be killed, or could not be cleaned up.',
    fix: 'Usually harmless; if it repeats, check the guest kernel handles ACPI power-down.',
  },
  KATA_ERR_DAEMON_START: {
    meaning: 'A host-side daemon the sandbox needs (virtiofsd) exited or did not create its socket in time.',
    fix: "Read the daemon's last output in the message; check its path (e.g. virtio_fs_daemon) with `kata-runtime check`.",
  },
  KATA_ERR_QMP: {
    meaning: 'QEMU answered a QMP command with an error (its class and description are in the message).',
    fix: 'Read the QMP error; it usually names the option or device QEMU refused.',
  },
  KATA_ERR_QMP_TIMEOUT: {
    meaning: 'QEMU did not answer a QMP command, or did not send an awaited event, in time.',
    fix: 'The VM may be overloaded or hung; check that QEMU is running and responsive.',
  },
  KATA_ERR_QMP_CLOSED: {
    meaning: 'The QMP connection closed (QEMU exited) while a command was pending.',
    fix: 'See why QEMU exited: its last stderr lines are reported with the sandbox failure.',
  },
  KATA_ERR_CLH_API: {
    meaning: "Cloud Hypervisor answered a REST API request with an error, or the connection to its API socket failed (the endpoint, HTTP status and Cloud Hypervisor's own message are in the text).",
    fix: "Read Cloud Hypervisor's message; a 4xx status usually names the vm.create field or device it refused, a 5xx the host resource it could not use.",
  },
  KATA_ERR_CLH_API_TIMEOUT: {
    meaning: 'Cloud Hypervisor did not answer a REST API request within its timeout.',
    fix: 'The VMM may be overloaded or hung; check that cloud-hypervisor is running. Confidential guests get longer timeouts already.',
  },
  KATA_ERR_CLH_NO_TDX: {
    meaning: 'The configuration asks for a TDX guest, but the cloud-hypervisor binary does not list "tdx" among the features vmm.ping reports (it was built without it).',
    fix: 'Install a cloud-hypervisor built with `--features tdx` and point [hypervisor.clh] path at it (`kata-runtime check` shows the features), or set confidential_guest = false.',
  },
  KATA_ERR_HOTPLUG_NO_SLOT: {
    meaning: 'Every hot-plug slot is in use: the pcie-root-ports reserved for virtio-blk, or the SCSI addresses of the virtio-scsi controller.',
    fix: 'Raise hotplug_root_ports in [hypervisor.qemu] (virtio-blk), or unplug a device first.',
  },
  KATA_ERR_HOTPLUG: {
    meaning: 'A device could not be hot-plugged; what was already added for it has been removed again.',
    fix: 'Read the cause (the hypervisor error) in the message; check the device path exists and is not in use.',
  },
  KATA_ERR_RESIZE: {
    meaning: "The VM could not be grown (or shrunk) to fit its containers' CPU and memory limits: a vCPU or memory hot-plug, or the guest's onlining of it, failed. What was added for it was removed again (memory stays, offline, where it cannot be unplugged) and the container was not created or updated.",
    fix: "Read the cause in the message; lower the container's limits, or raise the limit the message names (default_maxvcpus, default_maxmemory, memory_slots); static_sandbox_resource_mgmt = true sizes the VM at boot instead of hot-plugging.",
  },
  KATA_ERR_RESIZE_UNAVAILABLE: {
    meaning: "A container's CPU or memory limits need a VM that cannot be resized (a confidential guest has a fixed size) to grow; nothing was changed.",
    fix: "Size the VM at boot: static_sandbox_resource_mgmt = true with the pod's sandbox annotations (containerd's CRI sets io.kubernetes.cri.sandbox-cpu-quota, -cpu-period and -memory), or raise default_vcpus / default_memory.",
  },
  KATA_ERR_UNPLUG_TIMEOUT: {
    meaning: 'The guest did not release a hot-plugged device in time.',
    fix: 'The guest may be busy or not handle PCIe hot-unplug; the device stays attached until the sandbox stops.',
  },
  KATA_ERR_AGENT_UNREACHABLE: {
    meaning: 'The guest agent did not answer at its address before the dial deadline: the VM did not boot, or its agent did not start.',
    fix: 'Read the guest console log; on a slow host (TCG) allow a longer dial timeout ([agent.kata] dial_timeout).',
  },
  KATA_ERR_AGENT_HANDSHAKE: {
    meaning: 'The hybrid-vsock socket answered `CONNECT <port>` with something other than `OK <port>`.',
    fix: "Check that the path is the VM's vsock socket and that the agent listens on port 1024.",
  },
  KATA_ERR_AGENT_CALL: {
    meaning: 'The guest agent answered a request with an error, or did not answer in time (the RPC and gRPC code are in the message).',
    fix: "Read the agent's error; DEADLINE_EXCEEDED on a slow guest: raise the call's timeout; UNIMPLEMENTED: the agent lacks this RPC.",
  },
  KATA_ERR_AGENT_CLOSED: {
    meaning: 'The connection to the guest agent closed while requests were pending (the agent or the VM died).',
    fix: 'Read the guest console and hypervisor logs; the sandbox must be recreated.',
  },
  KATA_ERR_AGENT_ADDRESS: {
    meaning: 'The agent address is malformed or has an unknown scheme (the forms are unix:///path, hvsock:///path:port and vsock://cid:port).',
    fix: 'Correct the address the hypervisor plugin planned for the agent; a third-party plugin must use one of the three forms.',
  },
  KATA_ERR_VSOCK_UNSUPPORTED: {
    meaning: 'The agent address is AF_VSOCK but the host kernel has no vsock support (socket() fails with "Address family not supported by protocol").',
    fix: 'Load the host vsock modules (`modprobe vhost_vsock`), or use an agent channel without vhost-vsock: QEMU with virtio-serial, or Cloud Hypervisor (hybrid vsock).',
  },
  KATA_ERR_VSOCK_SOCAT: {
    meaning: 'The agent address is AF_VSOCK, which the runtime opens through socat (Node.js has no vsock sockets), and socat is not on PATH or is older than 1.7.4 (no VSOCK-CONNECT).',
    fix: 'Install socat 1.7.4 or later: `apt-get install socat` (Debian 12 ships 1.7.4.4).',
  },
  KATA_ERR_GUEST_IMAGE: {
    meaning: 'The guest image (kernel and initramfs) could not be built or is missing.',
    fix: 'Run `npm run guest:build` and read its progress output; it needs apt-get, dpkg-deb, depmod (kmod) and xz-utils, and access to the Debian archive.',
  },
  KATA_ERR_ROOTFS: {
    meaning: "A container's rootfs cannot reach the guest with this configuration (e.g. a directory rootfs in a confidential sandbox, which has no shared filesystem).",
    fix: 'Give the container a block-device rootfs (containerd devmapper snapshotter, or `kata-runtime run --rootfs <image or device>`), or enable a shared filesystem.',
  },
  KATA_ERR_VOLUME: {
    meaning: "A container's bind mount (a volume: Kubernetes volumes, /etc/hosts, `ctr run --mount type=bind`) cannot reach the guest: its source is missing, or the sandbox has no shared filesystem (a confidential sandbox has none by design).",
    fix: 'Check that the mount source exists on the host; for a confidential sandbox, put the data in the image instead of a host volume.',
  },
  KATA_ERR_NETWORK: {
    meaning: "The pod's network could not be mirrored into the VM: its network namespace is missing or not a namespace, an interface's tap device or tc filter could not be made, or the guest could not configure an interface or route. The error names the interface.",
    fix: 'Check that the network namespace given in the OCI spec (linux.namespaces, `ctr run --with-ns network:<path>`) exists while the sandbox starts, that /dev/net/tun exists, and that no other tap of that name is in the namespace.',
  },
  KATA_ERR_NETWORK_MODEL: {
    meaning: 'The configuration asks for a way of connecting the pod network to the VM (internetworking_model) that this runtime does not build.',
    fix: 'Set internetworking_model = "tcfilter" (the default), or "none" for a VM without a network.',
  },
  KATA_ERR_RUN_DIR: {
    meaning: 'The sandbox run directory cannot be created under the run root (/run/kata-ts, or KATA_TS_RUN_ROOT): as a non-root user, permission is denied.',
    fix: 'Run as root (running a sandbox needs it: bind mounts, hot-plug, /run/kata-ts), or point KATA_TS_RUN_ROOT at a directory you can write.',
  },
  KATA_ERR_INTERRUPTED: {
    meaning: 'A signal (SIGINT, SIGTERM or SIGHUP) interrupted the runtime while it started or ran a sandbox; what had started was stopped and its run directory removed.',
    fix: 'Nothing to undo; run the command again.',
  },
  KATA_ERR_SANDBOX: {
    meaning: 'A sandbox or container operation was asked for in a state that does not allow it (unknown or duplicate container, sandbox stopped or failed).',
    fix: 'Check the ids used; a failed sandbox must be stopped and created again.',
  },
  KATA_ERR_DEBUG_CONSOLE: {
    meaning: "kata-runtime exec cannot attach to the sandbox's guest debug console: no shim serves that sandbox id (no management socket /run/vc/sbs/<id>/shim-monitor.sock), the console is off (debug_console_enabled = false, the default), or another exec is attached.",
    fix: 'Check the sandbox id (ctr task ls, crictl pods); to use the console set debug_console_enabled = true in [agent.kata] (not allowed for TDX) and start the sandbox again; detach the other exec (Ctrl-]).',
  },
  KATA_ERR_MANAGEMENT_SOCKET: {
    meaning: "The shim did not open its sandbox's management socket (/run/vc/sbs/<id>/shim-monitor.sock): what is at /run/vc/sbs/<id> is a symlink, not a directory, or a directory of another user, or it cannot be made, or a live shim already serves that socket (the same sandbox id in another containerd namespace). The pod runs on without the socket (no metrics, no kata-runtime exec); the shim logs why.",
    fix: 'Find out who put what is at /run/vc/sbs/<id> there (no shim makes a symlink or a file), remove it, and start the pod again; the shim runs as root, which can make the directory.',
  },
  KATA_ERR_MONITOR: {
    meaning: 'kata-runtime monitor cannot serve: --listen is not HOST:PORT with a port from 0 to 65535, or the address cannot be listened on (in use, not an address of this host).',
    fix: 'Give --listen HOST:PORT (e.g. 127.0.0.1:8090, [::1]:8090) with a free port on an address of this host.',
  },
  KATA_ERR_MONITOR_SBS_ROOT: {
    meaning: "kata-runtime monitor cannot read the directory of the shims' sockets (/run/vc/sbs, or KATA_TS_SBS_ROOT): as a non-root user, permission is denied (it is root's, mode 0700, as Kata's is).",
    fix: "Run kata-runtime monitor as root (as Kata's kata-monitor runs), or point KATA_TS_SBS_ROOT at a directory you can read.",
  },
  KATA_ERR_SHIM: {
    meaning: 'containerd-shim-kata-v2 was started in a way it cannot work with (missing -id, -namespace or bundle, unknown action, socket already served by another shim).',
    fix: 'Let containerd start the shim (runtime type io.containerd.kata.v2); when running it by hand, give -namespace, -id, -address and run it in the bundle directory.',
  },
  KATA_ERR_INVALID_ID: {
    meaning: 'An id or namespace the shim was given (-id, -namespace, the CRI sandbox-id annotation, the id or exec id of a task API request) is not a containerd identifier, so it cannot safely name a file or directory; refused before anything is touched.',
    fix: 'Use letters and digits, optionally joined by single ".", "_" or "-" (no "/", no "..", at most 76 characters), as containerd itself requires of ids and namespaces.',
  },
  KATA_ERR_OCI_SPEC: {
    meaning: "The container's OCI spec (the bundle's config.json or an exec's process spec) is missing, not valid JSON, or lacks a field the runtime needs.",
    fix: 'Check the bundle containerd created; the error names the field. Specs written by containerd or CRI are valid.',
  },
  KATA_ERR_TASK_NOT_FOUND: {
    meaning: 'A task API call named a container or exec id this shim does not know.',
    fix: 'Check the id (`ctr task ls`); the task may already have been deleted.',
  },
  KATA_ERR_TASK_STATE: {
    meaning: 'A task API call is not allowed in the state the task is in (starting twice, deleting a running task, exec into a stopped container).',
    fix: 'Wait for the task to reach the state the call needs (`ctr task ls` shows it), or kill it first.',
  },
  KATA_ERR_NOT_IMPLEMENTED: {
    meaning: 'The feature asked for is not built in this runtime (e.g. checkpoints, binary:// log URIs); the README lists what is not built.',
    fix: 'Run without the feature (e.g. without a checkpoint); see "What is not built yet" in the README.',
  },
  KATA_ERR_ANNOTATION: {
    meaning: "One or more of a pod's io.katacontainers.* annotations were refused (not enabled by enable_annotations, a path outside its valid_*_paths list, a malformed value, or not supported); every refused annotation is listed.",
    fix: 'Remove the annotations listed, or have the administrator allow them: add the name to enable_annotations and the path to the valid_*_paths list named for each, in the [hypervisor.<name>] section.',
  },
  KATA_ERR_UNTRUSTED_PATH: {
    meaning: 'Running as root, the runtime refused to import or run a file (a plugin module, the hypervisor or a daemon binary, a configuration chosen by annotation) that is, or sits below a directory that is, not owned by root or writable by group or others (as sshd StrictModes judges).',
    fix: 'chown root and chmod go-w the file and directory named (a directory others must write to needs the sticky bit, like /tmp), or install the file in a root-owned directory.',
  },
  KATA_ERR_TEMPLATE: {
    meaning: 'A `kata-runtime factory` command could not make, read or remove the VM template under [factory] template_path (templating not enabled, the template VM did not boot or its state could not be saved, the tmpfs could not be mounted, another init or destroy holds the lock, the directory is not a template made by init), or a path unfit for a template was configured. A sandbox never fails for a missing, stale, untrusted or unrestorable template: it boots cold and logs why.',
    fix: 'Set [factory] enable_template = true with a hypervisor that declares vm:template (qemu, shared_fs other than virtio-fs), run as root, keep template_path an absolute path of letters, digits and `/._-` (no trailing or double `/`); read the error and the template VM console log it names, then run `kata-runtime factory destroy` and `factory init` again.',
  },
  KATA_ERR_INTERNAL: {
    meaning: 'An unexpected internal error (a bug in the runtime).',
    fix: 'Report it with the output of `kata-runtime --debug` and the configuration used.',
  },
} satisfies Record<string, ErrorCodeInfo>);

export type ErrorCode = keyof typeof ERROR_CODES;

/** A code of a plugin's own: `<NAME>_ERR_<WHAT>` (see the naming rule at the top of this module). */
export type PluginErrorCode = `${string}_ERR_${string}`;

/** True when the runtime's table knows `code`. */
export function isKnownErrorCode(code: string): code is ErrorCode {
  return Object.prototype.hasOwnProperty.call(ERROR_CODES, code);
}

/** The code prefix a plugin's own codes must carry: `my-policy` → `MY_POLICY_ERR_`. */
export function pluginErrorCodePrefix(plugin: string): string {
  return `${plugin.replace(/[^A-Za-z0-9]+/g, '_').replace(/^_+|_+$/g, '').toUpperCase()}_ERR_`;
}

export interface KataErrorOptions {
  /** The plugin on whose behalf the error is raised. */
  plugin?: string;
  /** The hook in which it was raised. */
  hook?: string;
  /** Dotted configuration key path, e.g. `hypervisor.clh.shared_fs`. */
  key?: string;
  /** The offending value, when there is one. */
  value?: unknown;
  /** What the user should do; defaults to the code's generic fix. */
  fix?: string;
  cause?: unknown;
}

const KATA_ERROR = Symbol.for('kata-ts.KataError');

/** Base class of every coded error. `code`, `plugin`, `hook` and `key` are what tests and tools assert on. */
export class KataError extends Error {
  /**
   * `instanceof` by brand, not by prototype: a third-party plugin imports `kata-ts/plugin` from the
   * unbundled package while the CLI runs from a bundle, so two copies of this class can meet.
   */
  static override [Symbol.hasInstance](value: unknown): boolean {
    // Subclasses keep ordinary prototype checks.
    if (this !== KataError) return Function.prototype[Symbol.hasInstance].call(this, value);
    return value !== null && typeof value === 'object' && (value as Record<symbol, unknown>)[KATA_ERROR] === true;
  }
  readonly [KATA_ERROR] = true;
  /** A code of the runtime's table, or (raised by a plugin) one of the plugin's own. */
  readonly code: ErrorCode | PluginErrorCode;
  /** The message without the `[plugin x]` prefix. */
  readonly text: string;
  readonly plugin: string | undefined;
  readonly hook: string | undefined;
  readonly key: string | undefined;
  readonly value: unknown;
  readonly fix: string;

  constructor(code: ErrorCode | PluginErrorCode, message: string, opts: KataErrorOptions = {}) {
    super(opts.plugin ? `[plugin ${opts.plugin}] ${message}` : message, opts.cause === undefined ? undefined : { cause: opts.cause });
    this.name = 'KataError';
    this.code = code;
    this.text = message;
    this.plugin = opts.plugin;
    this.hook = opts.hook;
    this.key = opts.key;
    this.value = opts.value;
    this.fix = opts.fix ?? (isKnownErrorCode(code) ? ERROR_CODES[code].fix : unknownCodeFix(opts.plugin));
  }

  toJSON(): Record<string, unknown> {
    return dropUndefined({
      code: this.code,
      message: this.message,
      plugin: this.plugin,
      hook: this.hook,
      key: this.key,
      value: this.value,
      fix: this.fix,
    });
  }
}

function unknownCodeFix(plugin: string | undefined): string {
  return plugin ? `See the documentation of plugin ${plugin} for this code.` : 'See the documentation of the component that raised this code.';
}

/**
 * One problem found while judging a configuration. The validated config phase collects these from
 * the schema check, the core's value rules and every plugin, then throws them together.
 */
export interface Problem {
  readonly code: ErrorCode | PluginErrorCode;
  /** Dotted key path the problem is about. */
  readonly key: string;
  readonly value?: unknown;
  readonly reason: string;
  readonly fix: string;
  /** Plugin that raised it; absent for the core's own rules. */
  readonly plugin?: string;
  readonly hook?: string;
}

/** Raised when a configuration has one or more problems; `problems` holds all of them. */
export class ConfigInvalidError extends KataError {
  readonly problems: readonly Problem[];
  readonly configPath: string | undefined;

  constructor(problems: readonly Problem[], configPath?: string) {
    const where = configPath ? `${configPath}: ` : '';
    const lines = problems.map((p) => `  - ${formatProblem(p)}`);
    super('KATA_ERR_CONFIG_INVALID', `${where}invalid configuration (${problems.length} problem${problems.length === 1 ? '' : 's'}):\n${lines.join('\n')}`);
    this.problems = problems;
    this.configPath = configPath;
  }

  override toJSON(): Record<string, unknown> {
    return { code: this.code, configPath: this.configPath, problems: this.problems.map((p) => dropUndefined({ ...p })) };
  }
}

/** `[plugin tdx] hypervisor.clh.shared_fs = "virtio-fs": reason (fix: …) [KATA_ERR_CONFIG_VETO]` */
export function formatProblem(p: Problem): string {
  const who = p.plugin ? `[plugin ${p.plugin}] ` : '';
  const val = p.value === undefined ? '' : ` = ${formatValue(p.value)}`;
  return `${who}${p.key}${val}: ${p.reason} (fix: ${p.fix}) [${p.code}]`;
}

export function formatValue(v: unknown): string {
  if (typeof v === 'bigint') return v.toString();
  try {
    return JSON.stringify(v) ?? String(v);
  } catch {
    return String(v);
  }
}

/** The words of an error without any `[plugin x]` prefix: for messages built around another error. */
export function errorText(e: unknown): string {
  if (e instanceof KataError) return e.text;
  return e instanceof Error ? e.message : String(e);
}

export function isKataError(e: unknown): e is KataError {
  return e instanceof KataError;
}

/** Wraps anything thrown into a KataError, keeping coded errors as they are. */
export function toKataError(e: unknown, fallback: ErrorCode = 'KATA_ERR_INTERNAL', opts: KataErrorOptions = {}): KataError {
  if (e instanceof KataError) return e;
  const msg = e instanceof Error ? e.message : String(e);
  return new KataError(fallback, msg, { ...opts, cause: e });
}

/** Deletes the keys whose value is undefined (for JSON output and exact-equality tests). */
export function dropUndefined<T extends object>(o: T): T {
  for (const k of Object.keys(o) as (keyof T)[]) if (o[k] === undefined) delete o[k];
  return o;
}
