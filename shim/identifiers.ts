/**
 * The shim's use of containerd's identifier rule (core/identifiers.ts): every Task API request's ids
 * are checked before the service sees them.
 */
import { checkIdentifier } from '../core/identifiers.js';
import type { KataError } from '../core/errors.js';
import { GrpcCode, TtrpcError, type ServiceImpl } from '../wire/ttrpc/index.js';
import type { Task } from '../wire/containerd/proto.gen.js';

export { MAX_IDENTIFIER_LENGTH, checkIdentifier, identifierProblem } from '../core/identifiers.js';

/**
 * The Task service with every request's `id` (and `execId`, when given) checked first: a refused id
 * is answered INVALID_ARGUMENT, with the code and fix, before the service sees the request.
 */
export function guardTaskIds(impl: ServiceImpl<typeof Task>, onRefused?: (err: KataError, method: string) => void): ServiceImpl<typeof Task> {
  const guarded: Record<string, unknown> = {};
  for (const [name, fn] of Object.entries(impl) as [string, ((req: unknown, ctx: unknown) => unknown) | undefined][]) {
    if (!fn) continue;
    guarded[name] = (req: { id?: unknown; execId?: unknown }, ctx: unknown) => {
      try {
        if (typeof req.id === 'string') checkIdentifier(`${name}.id`, req.id);
        if (typeof req.execId === 'string' && req.execId !== '') checkIdentifier(`${name}.exec_id`, req.execId);
      } catch (e) {
        const k = e as KataError;
        onRefused?.(k, name);
        throw new TtrpcError(GrpcCode.INVALID_ARGUMENT, `${k.message} [${k.code}] (fix: ${k.fix})`, { cause: k });
      }
      return fn.call(impl, req, ctx);
    };
  }
  return guarded as ServiceImpl<typeof Task>;
}
