import type { CommandContext } from './main.js';
// Placeholder replaced by the env implementation in this same change series.
export async function envCommand(ctx: CommandContext): Promise<number> {
  ctx.io.err('kata-runtime: env is not implemented yet\n');
  return 1;
}
