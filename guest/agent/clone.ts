/**
 * What a VM cloned from a template needs from its agent (kata-agent's RPCs):
 *
 * SetGuestDateTime: a clone's clock goes on from the template's moment of saving; the host sets it.
 *
 * ReseedRandomDev: a clone starts with the template's kernel RNG state and the template's machine id. The host sends random bytes; they are written
 * to /dev/random, which mixes them into the kernel's input pool, and the guest gets a new
 * /etc/machine-id derived from them and from the kernel RNG.
 *
 * Writing does not force the kernel's CRNG to reseed at once (that takes the RNDRESEEDCRNG ioctl,
 * which node cannot issue); the clone's QEMU gives the guest a new VM generation ID (vmgenid), on
 * which Linux (5.18+, CONFIG_VMGENID) reseeds the CRNG itself as soon as the clone resumes.
 */
import { createHash } from 'node:crypto';
import { open, writeFile } from 'node:fs/promises';
import { internal, invalidArgument } from './errors.js';
import { busyboxOk } from './sys.js';

/** At most this many bytes per request (kata-agent takes any size; a runaway request stops here). */
export const MAX_RESEED_BYTES = 64 * 1024;

export interface EntropyPaths {
  readonly random: string;
  readonly urandom: string;
  readonly machineId: string;
}

export const GUEST_ENTROPY_PATHS: EntropyPaths = Object.freeze({ random: '/dev/random', urandom: '/dev/urandom', machineId: '/etc/machine-id' });

/** Mixes `data` into the guest's entropy pool and gives the guest a new machine id; returns that id. */
export async function reseedRandomDev(data: Uint8Array, paths: EntropyPaths = GUEST_ENTROPY_PATHS): Promise<string> {
  if (data.length === 0) throw invalidArgument('ReseedRandomDev without data');
  if (data.length > MAX_RESEED_BYTES) throw invalidArgument(`ReseedRandomDev with ${data.length} bytes (at most ${MAX_RESEED_BYTES})`);
  await writeFile(paths.random, data);
  const fresh = Buffer.alloc(32);
  const fh = await open(paths.urandom, 'r');
  try {
    await fh.read(fresh, 0, fresh.length, null);
  } finally {
    await fh.close();
  }
  // systemd's format: 32 lowercase hex digits and a newline.
  const id = createHash('sha256').update(data).update(fresh).digest('hex').slice(0, 32);
  await writeFile(paths.machineId, `${id}\n`, { mode: 0o444 });
  return id;
}

/** Sets the guest's wall clock to `sec` (seconds since the epoch; busybox `date` takes whole seconds). */
export async function setGuestDateTime(sec: bigint | number): Promise<void> {
  const s = BigInt(sec);
  // Before 2000 or after 9999: a caller's bug, not a time to set.
  if (s < 946_684_800n || s > 253_402_300_799n) throw invalidArgument(`SetGuestDateTime: ${s} is not a plausible time`);
  await busyboxOk('date', ['-s', `@${s}`]).catch((e: Error) => {
    throw internal(`cannot set the guest clock: ${e.message}`, e);
  });
}
