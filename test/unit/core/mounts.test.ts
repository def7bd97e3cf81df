import assert from 'node:assert/strict';
import { mountsUnderIn } from '../../../core/mounts.js';

/** A mountinfo line mounting something at `point` (field 5). */
const line = (id: number, point: string) => `${id} 1 0:${id} / ${point} rw,relatime shared:1 - tmpfs tmpfs rw`;

describe('mountsUnderIn', () => {
  it('lists what a mountinfo text mounts at a directory or below it, deepest first, escapes undone, neighbours with the same prefix left out', () => {
    const table = [line(1, '/'), line(2, '/run/t'), line(3, '/run/t/a\\040b'), line(4, '/run/t/a\\040b/c'), line(5, '/run/tt'), ''].join('\n');
    assert.deepEqual(mountsUnderIn(table, '/run/t'), ['/run/t/a b/c', '/run/t/a b', '/run/t']);
    assert.deepEqual(mountsUnderIn(table, '/run/none'), []);
  });
});
