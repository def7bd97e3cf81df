import type { CommandContext } from './main.js';
// Placeholder replaced by the check implementation in this same change series.
export async function checkCommand(ctx: CommandContext): Promise<number> {
  ctx.io.err('kata-runtime: check is not implemented yet\n');
  return 1;
}
