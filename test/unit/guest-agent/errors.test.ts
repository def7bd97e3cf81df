/** The gRPC statuses the guest agent answers with (guest/agent/errors.ts). */
import assert from 'node:assert/strict';
import { GrpcCode } from '../../../wire/ttrpc/codes.js';
import { TtrpcError } from '../../../wire/ttrpc/errors.js';
import { EOF_MESSAGE, alreadyExists, endOfFile, failedPrecondition, invalidArgument, isEndOfFile, notFound, toStatus } from '../../../guest/agent/errors.js';

describe('guest agent: status codes', () => {
  it('names the gRPC code of each kind of failure', () => {
    assert.equal(notFound('x').code, GrpcCode.NOT_FOUND);
    assert.equal(alreadyExists('x').code, GrpcCode.ALREADY_EXISTS);
    assert.equal(invalidArgument('x').code, GrpcCode.INVALID_ARGUMENT);
    assert.equal(failedPrecondition('x').code, GrpcCode.FAILED_PRECONDITION);
  });

  it("ends a stream as kata-agent does: INTERNAL with its message", () => {
    const eof = endOfFile();
    assert.equal(eof.code, GrpcCode.INTERNAL);
    assert.equal(eof.statusMessage, 'read meet eof');
    assert.equal(EOF_MESSAGE, 'read meet eof');
    assert.ok(isEndOfFile(eof));
    assert.ok(!isEndOfFile(new TtrpcError(GrpcCode.INTERNAL, 'mount failed')));
    assert.ok(!isEndOfFile(new Error('read meet eof')));
  });

  it('answers a status as it is and anything else as INTERNAL with its message', () => {
    const nf = notFound('container c1 not found');
    assert.equal(toStatus(nf), nf);
    const s = toStatus(new Error('EACCES: permission denied'));
    assert.equal(s.code, GrpcCode.INTERNAL);
    assert.equal(s.statusMessage, 'EACCES: permission denied');
    assert.equal(toStatus('plain').statusMessage, 'plain');
  });
});
