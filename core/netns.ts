/**
 * Running a program inside a sandbox's network namespace. `nsenter --net=<path>` enters only the
 * network namespace, so the program keeps the host's filesystem (its control sockets, the run
 * directory) and execs in place: the pid is the program's own.
 */

/** The argv that runs `binary args` in network namespace `netns` (a path), or as is without one. */
export function inNetns(netns: string | undefined, binary: string, args: readonly string[]): { binary: string; args: string[] } {
  if (!netns) return { binary, args: [...args] };
  return { binary: 'nsenter', args: [`--net=${netns}`, '--', binary, ...args] };
}
